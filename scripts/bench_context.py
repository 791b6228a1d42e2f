"""How the cost of a verified forward grows with the context: time(rows) / time(1) at several cache lengths, with
the CPU's decode attention as shipped (grouped-query heads folded into the rows, attention.folded_attention) and as
MLX's own SDPA runs it (its unfused fallback on the CPU), beside mlx_lm's own one-token step over the same cache.

    python scripts/bench_context.py --contexts 512,2048,6000,8000 --rows 1,9,17

Rows: the linear layout after one committed token (x + rows - 1 masks), as costs.time_forward runs it.
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
@click.option("--rounds", default=2, show_default=True, help="Interleaved rounds of both attentions per context.")
@click.option("--out", default="results/bench_context.json", show_default=True)
def main(contexts, row_counts, repeats, rounds, out):
    model, _ = mlx_sbd.load()
    contexts = [int(c) for c in contexts.split(",")]
    row_counts = [int(r) for r in row_counts.split(",")]
    fold = attention.FOLD_MAX_ROWS
    results = {"machine": machine(), "dtype": str(model.lm.model.embed_tokens.weight.dtype), "rounds": rounds,
               "repeats": repeats, "seconds": {}, "mlx_lm_step": {}}
    print(f"{'context':>7} {'attention':>9} {'mlx_lm t(1)':>11} " + " ".join(f"{'t(' + str(r) + ') ms':>10}" for r in row_counts)
          + " " + " ".join(f"{'x t(1) @' + str(r):>10}" for r in row_counts[1:]))
    for ctx in contexts:
        cache = model.make_cache()
        for i in range(0, ctx, 512):
            model.lm.model(mx.zeros((1, min(512, ctx - i)), mx.int32), cache=cache)
            mx.eval([c.state for c in cache])
        runs = {"folded": [], "sdpa": []}
        base = []
        for _ in range(rounds):
            base.append(time_mlx_lm_forward(model, cache, 1, repeats))
            for name, limit in (("folded", fold), ("sdpa", 0)):
                attention.FOLD_MAX_ROWS = limit
                try:
                    runs[name].append({r: time_forward(model, cache, r, r - 1, repeats) for r in row_counts})
                finally:
                    attention.FOLD_MAX_ROWS = fold
        results["mlx_lm_step"][str(ctx)] = base
        for name, rs in runs.items():
            t = {r: statistics.median(run[r] for run in rs) for r in row_counts}
            results["seconds"][f"{ctx}/{name}"] = {"median": t, "rounds": rs}
            print(f"{ctx:7d} {name:>9} {1e3 * statistics.median(base):11.1f} " + " ".join(f"{1e3 * t[r]:10.1f}" for r in row_counts)
                  + " " + " ".join(f"{t[r] / t[row_counts[0]]:10.2f}" for r in row_counts[1:]), flush=True)
    save(results, out)


if __name__ == "__main__":
    from mlx_sbd.backend import preload_openblas_and_reexec

    preload_openblas_and_reexec()
    main()
