"""How the cost of a verified forward grows with the context: time(rows) / time(1) at several cache lengths, beside
mlx_lm's own one-token step over the same cache, for variants of the decode attention:

- window: as shipped (grouped-query heads folded into the rows, attention.folded_attention; the mask rows see the
  last attention.DRAFT_WINDOW cached keys, the causal rows all of them);
- full: the same without the window (every row sees every cached key);
- sdpa: MLX's own SDPA (its unfused fallback on the CPU), without the window.

    python scripts/bench_context.py --contexts 512,2048,6000,8000 --rows 1,9,17 --causal 1,4

Rows: the linear layout after `causal` causal rows (x and causal - 1 drafts), the rest masks, as
costs.time_forward runs it; the ratio is to the one-row forward over the same cache. mlx_lm t(c): mlx_lm's own
causal forward of c rows over the same cache (what its speculative decoding verifies c tokens with; c = 1: its
one-token step), the reference for the causal rows' share.
"""

import statistics
import sys
from pathlib import Path

import click
import mlx.core as mx

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, save, time_mlx_lm_forward  # noqa: E402

import mlx_sbd  # noqa: E402
from mlx_sbd import attention  # noqa: E402
from mlx_sbd.costs import time_forward  # noqa: E402


@click.command()
@click.option("--contexts", default="512,2048,6000,8000", show_default=True)
@click.option("--rows", "row_counts", default="1,9,17", show_default=True)
@click.option("--repeats", default=5, show_default=True)
@click.option("--causal", "causal_rows", default="1", show_default=True,
              help="Causal rows per forward (x and drafts), comma-separated: a table row each.")
@click.option("--variants", default="window,full", show_default=True, help="Of window, full, sdpa (see above).")
@click.option("--rounds", default=2, show_default=True, help="Interleaved rounds of the variants per context.")
@click.option("--out", default="results/bench_context.json", show_default=True)
def main(contexts, row_counts, causal_rows, variants, repeats, rounds, out):
    model, _ = mlx_sbd.load()
    contexts = [int(c) for c in contexts.split(",")]
    row_counts = [int(r) for r in row_counts.split(",")]
    causal_rows = [int(c) for c in causal_rows.split(",")]
    variants = variants.split(",")
    settings = {"window": (attention.FOLD_MAX_ROWS, attention.DRAFT_WINDOW), "full": (attention.FOLD_MAX_ROWS, None),
                "sdpa": (0, None)}  # (FOLD_MAX_ROWS, DRAFT_WINDOW)
    shipped = settings["window"]
    results = {"machine": machine(), "dtype": str(model.lm.model.embed_tokens.weight.dtype), "rounds": rounds,
               "repeats": repeats, "draft_window": attention.DRAFT_WINDOW, "seconds": {}, "mlx_lm_step": {}}
    print(f"{'context':>7} {'variant':>7} {'causal':>6} {'mlx_lm t(1)':>11} {'mlx_lm t(c)':>11} "
          + " ".join(f"{'t(' + str(r) + ') ms':>10}" for r in row_counts)
          + " " + " ".join(f"{'x t(1) @' + str(r):>10}" for r in row_counts[1:]))
    for ctx in contexts:
        cache = model.make_cache()
        for i in range(0, ctx, 512):
            model.lm.model(mx.zeros((1, min(512, ctx - i)), mx.int32), cache=cache)
            mx.eval([c.state for c in cache])
        runs = {(name, c): [] for name in variants for c in causal_rows}
        base = {c: [] for c in sorted({1, *causal_rows})}  # mlx_lm's own causal forward of c rows (c = 1: its step)
        for _ in range(rounds):
            for c in base:
                base[c].append(time_mlx_lm_forward(model, cache, c, repeats))
            for name, c in runs:
                attention.FOLD_MAX_ROWS, attention.DRAFT_WINDOW = settings[name]
                try:
                    runs[name, c].append({r: time_forward(model, cache, r, max(r - c, 0), repeats)
                                          for r in row_counts})
                finally:
                    attention.FOLD_MAX_ROWS, attention.DRAFT_WINDOW = shipped
        results["mlx_lm_step"][str(ctx)] = base
        for (name, c), rs in runs.items():
            t = {r: statistics.median(run[r] for run in rs) for r in row_counts}
            results["seconds"][f"{ctx}/{name}/{c}"] = {"median": t, "rounds": rs}
            print(f"{ctx:7d} {name:>7} {c:6d} {1e3 * statistics.median(base[1]):11.1f} "
                  f"{1e3 * statistics.median(base[c]):11.1f} "
                  + " ".join(f"{1e3 * t[r]:10.1f}" for r in row_counts)
                  + " " + " ".join(f"{t[r] / t[row_counts[0]]:10.2f}" for r in row_counts[1:]), flush=True)
    save(results, out)


if __name__ == "__main__":
    from mlx_sbd.backend import preload_openblas_and_reexec

    preload_openblas_and_reexec()
    main()
