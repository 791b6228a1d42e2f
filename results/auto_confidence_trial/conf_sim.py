"""auto with and without the first draft's confidence: tokens per forward, rows per forward, and tok/s predicted
from the cached time(rows) table (independent of the machine's load), same prompts, same table. Lossless check vs
plain decoding."""
import sys, json
import mlx_sbd
from mlx_sbd import costs, drafting
from mlx_sbd.drafting import Drafter, forget
from mlx_sbd.heldout import heldout_prompts
costs.CHECK_FORWARDS = 10**9
n, T = int(sys.argv[1]), int(sys.argv[2])
m, tok = mlx_sbd.load()
cost = costs.cached_row_cost(m)
P = heldout_prompts(tok, n)
orig = Drafter.wants_confidence
res = {}
for kind, prompts in P.items():
    for variant in ("position", "confidence"):
        Drafter.wants_confidence = orig if variant == "confidence" else property(lambda self: False)
        forget(m)
        toks = fwd = rows = 0; secs = 0.0; outs = []
        for ids in prompts:
            prev = 0; ctx = len(ids); out = []
            for r in mlx_sbd.stream_generate(m, tok, ids, max_tokens=T):
                if r.rows > prev:
                    secs += cost(r.rows - prev, ctx)
                prev = r.rows; ctx = len(ids) + r.generation_tokens
                out.append(r.text)
            toks += r.generation_tokens; fwd += r.nfe; rows += r.rows; outs.append("".join(out))
        res[(kind, variant)] = outs
        print(f"{kind:8s} {variant:10s} tok/fwd {toks/fwd:.3f} rows/fwd {rows/fwd:.2f} predicted tok/s {toks/secs:.2f}", flush=True)
    Drafter.wants_confidence = orig
    forget(m)
    plain = ["".join(r.text for r in mlx_sbd.stream_generate(m, tok, ids, max_tokens=T, block_size=1)) for ids in prompts]
    base_secs = None
    print(kind, "lossless:", res[(kind, "position")] == plain, res[(kind, "confidence")] == plain,
          f"plain predicted tok/s {1 / cost(1, 200):.2f}")
