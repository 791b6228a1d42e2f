"""How the cost of a verified forward grows with the context: time(rows) / time(1) at several cache lengths, for
the decode step's attention as it is (one SDPA call with the boolean block mask) and split into two SDPA calls
that need no mask array (the causal rows over the keys up to the last causal row with mask="causal", the mask
block over every key with no mask).

    python scripts/bench_context.py --contexts 512,2048,6000,8000 --rows 1,9,17
"""

import sys
from pathlib import Path

import click
import mlx.core as mx

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, save  # noqa: E402

import mlx_sbd  # noqa: E402
from mlx_sbd import attention  # noqa: E402
from mlx_sbd.costs import time_forward  # noqa: E402


def split_block_attention(q, k, v, scale, offset, causal_point):
    """Causal rows: keys up to offset + causal_point with SDPA's own causal mask; block rows: every key, no mask."""
    parts = []
    if causal_point > 0:
        n = offset + causal_point
        parts.append(mx.fast.scaled_dot_product_attention(q[:, :, :causal_point], k[:, :, :n], v[:, :, :n],
                                                          scale=scale, mask="causal"))
    if causal_point < q.shape[2]:
        parts.append(mx.fast.scaled_dot_product_attention(q[:, :, causal_point:], k, v, scale=scale))
    return parts[0] if len(parts) == 1 else mx.concatenate(parts, axis=2)


@click.command()
@click.option("--contexts", default="512,2048,6000,8000", show_default=True)
@click.option("--rows", "row_counts", default="1,9,17", show_default=True)
@click.option("--repeats", default=5, show_default=True)
@click.option("--out", default="results/bench_context.json", show_default=True)
def main(contexts, row_counts, repeats, out):
    model, _ = mlx_sbd.load()
    contexts = [int(c) for c in contexts.split(",")]
    row_counts = [int(r) for r in row_counts.split(",")]
    reference = attention.block_attention
    results = {"machine": machine(), "dtype": str(model.lm.model.embed_tokens.weight.dtype), "seconds": {}}
    print(f"{'context':>7} {'variant':>8} " + " ".join(f"{'t(' + str(r) + ') ms':>10}" for r in row_counts)
          + " " + " ".join(f"{'x t(1) @' + str(r):>10}" for r in row_counts[1:]))
    for ctx in contexts:
        cache = model.make_cache()
        for i in range(0, ctx, 512):
            model.lm.model(mx.zeros((1, min(512, ctx - i)), mx.int32), cache=cache)
            mx.eval([c.state for c in cache])
        for name, fn in (("mask", reference), ("split", split_block_attention)):
            attention.block_attention = fn
            try:
                # the linear layout after one committed token: x + (rows - 1) masks
                t = {r: time_forward(model, cache, r, r - 1, repeats) for r in row_counts}
            finally:
                attention.block_attention = reference
            results["seconds"][f"{ctx}/{name}"] = t
            print(f"{ctx:7d} {name:>8} " + " ".join(f"{1e3 * t[r]:10.1f}" for r in row_counts) + " "
                  + " ".join(f"{t[r] / t[row_counts[0]]:10.2f}" for r in row_counts[1:]))
    save(results, out)


if __name__ == "__main__":
    from mlx_sbd.backend import preload_openblas_and_reexec

    preload_openblas_and_reexec()
    main()
