"""Where the right token sits in the mask block's distribution, per draft position, teacher-forced on the base
model's own greedy answers to held-out prompts: how often it is the block's top 1 / 2 / 3 / 4 / 8 (what drafts of
several candidates per position, a tree, could pass), and how often the top 1 is right by the probability the block
gave it (whether that confidence could price a draft). Greedy verified decoding passes a draft exactly when it is
the base's next token, so "right" here is what verification would accept, position by position (marginals: not
conditioned on the drafts before being right).

For each answer position p: one forward over the cache holding prompt + answer[:p] with [answer[p]] + k masks (the
verified layout's mask block after the last token), M_j predicting answer[p + j]; M1 is the position the causal
row supplies, M2.. the drafts.

    python scripts/draft_ranks.py --n 8 --out results/draft_ranks.json
"""

import click
import mlx.core as mx
import numpy as np
from common import machine, save
from mlx_lm.generate import stream_generate
from mlx_lm.models.cache import trim_prompt_cache

import mlx_sbd
from mlx_sbd.attention import DRAFT_WINDOW, BlockMask
from mlx_sbd.decode import make_prompt_cache, prefill
from mlx_sbd.heldout import KINDS, heldout_prompts
from mlx_sbd.model import MASK_ID

TOPS = (1, 2, 3, 4, 8)
BINS = (0.0, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9, 1.0001)


def block_scores(model, prompt, answer, k):
    """[(rank of the right token, probability of the block's top token)] per position p, for M1..Mk."""
    seq = list(prompt) + list(answer)
    cache = make_prompt_cache(model)
    prefill(model, cache, seq[: len(prompt) - 1])
    out = []
    for p in range(len(prompt) - 1, len(seq) - 1):
        x = mx.array([seq[p]] + [MASK_ID] * k)
        logits = model.forward(x, mask=BlockMask(causal_point=1, window=DRAFT_WINDOW), cache=cache.layers,
                               mask_rows=k)[1:].astype(mx.float32)
        trim_prompt_cache(cache.layers, k)
        n = min(k, len(seq) - 1 - p)  # positions p+1 .. p+n exist
        right = mx.array(seq[p + 1 : p + 1 + n])
        lg = logits[:n]
        target = mx.take_along_axis(lg, right[:, None], axis=-1)
        rank = (lg > target).sum(-1)
        top = mx.exp(lg.max(-1) - mx.logsumexp(lg, axis=-1))
        out.append([(r, round(t, 3)) for r, t in zip(rank.tolist(), top.tolist())])
    return out


@click.command()
@click.option("--adapter-path", default=None, help="Default: the built-in model's shipped adapter.")
@click.option("--n", default=8, show_default=True, help="Held-out prompts of each kind.")
@click.option("--max-tokens", default=64, show_default=True, help="Answer tokens per prompt.")
@click.option("--block-size", "k", default=8, show_default=True)
@click.option("--kinds", default=",".join(KINDS), show_default=True)
@click.option("--out", default="results/draft_ranks.json", show_default=True)
def main(adapter_path, n, max_tokens, k, kinds, out):
    model, tokenizer = mlx_sbd.load(adapter_path=adapter_path)
    result = {"machine": machine(), "adapter": adapter_path or "built-in", "n": n, "max_tokens": max_tokens, "k": k,
              "kinds": {}}
    for kind, prompts in heldout_prompts(tokenizer, n, kinds=kinds.split(",")).items():
        steps = []
        for ids in prompts:
            answer = [r.token for r in stream_generate(model.lm, tokenizer, mx.array(ids), max_tokens=max_tokens)]
            steps += block_scores(model, ids, answer, k)
        result["kinds"][kind] = steps
        print(f"\n{kind}: {len(steps)} positions; share of right tokens in the block's top j, draft positions 1-4 "
              "(M2..M5)")
        for top in TOPS:
            shares = [np.mean([s[j][0] < top for s in steps if len(s) > j]) for j in range(1, 5)]
            print(f"  top {top}: " + "  ".join(f"{x:.2f}" for x in shares))
        first = [(s[1][1], s[1][0] == 0) for s in steps if len(s) > 1]  # draft position 1: (top prob, right)
        cells = []
        for lo, hi in zip(BINS, BINS[1:]):
            sel = [ok for p, ok in first if lo <= p < hi]
            if sel:
                cells.append(f"[{lo:.1f},{min(hi, 1):.1f}) {np.mean(sel):.2f} of {len(sel)}")
        print("  first draft right, by the probability the block gave it: " + ";  ".join(cells))
        m1 = np.array([s[0][0] == 0 for s in steps if len(s) > 1])
        d1 = np.array([s[1][0] == 0 for s in steps if len(s) > 1])
        print(f"  first draft right when M1 (the causal row's position) is right: {d1[m1].mean():.2f} of {m1.sum()}; "
              f"when it is wrong: {d1[~m1].mean():.2f} of {(~m1).sum()}")
    save(result, out)


if __name__ == "__main__":
    from mlx_sbd.backend import preload_openblas_and_reexec

    preload_openblas_and_reexec()
    main()
