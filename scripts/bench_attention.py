"""Benchmark the decode-step attention: the Metal kernel vs mx.fast.scaled_dot_product_attention + boolean mask.

Both paths get the same inputs as in the decode loop: q [1, Hq, q_len, D] and cache views k/v [1, Hkv, S, D]
sliced from a larger buffer, with the SBD mask (the first q_len/2 rows causal, the rest the block). The
reference timing includes building the mask, as mlx_sbd.attention.block_attention does each step.
Prints a table, writes the raw numbers as JSON, and states the machine. Without Metal (Linux) only the
reference path runs, and the table says so.

  python scripts/bench_attention.py [--out bench_attention.json] [--lengths 256,1024,...] [--iters 50]
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import mlx.core as mx

sys.path.insert(0, str(Path(__file__).parent))
from common import machine  # noqa: E402

from mlx_sbd.masks import inference_mask  # noqa: E402
from mlx_sbd.metal_kernel import metal_block_attention  # noqa: E402

LENGTHS = [256, 512, 1024, 2048, 4096, 8192, 16384, 32768]
Q_LENS = [4, 8, 16, 32]
GQAS = [1, 4, 8]
HEAD_DIMS = [64, 128]
N_Q_HEADS = 32


def reference(q, k, v, scale, offset, causal_point):
    mask = inference_mask(q.shape[2], offset, causal_point)
    return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)


def timed(fn, iters: int) -> float:
    """Median milliseconds of fn() evaluated, after warm-up (the first call builds the kernel)."""
    for _ in range(3):
        mx.eval(fn())
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        mx.eval(fn())
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def bench_one(S: int, q_len: int, gqa: int, D: int, dtype, iters: int, metal: bool) -> dict:
    Hkv = N_Q_HEADS // gqa
    offset, causal_point, scale = S - q_len, q_len // 2, D**-0.5
    keys = mx.random.split(mx.random.key(S * 131 + q_len * 7 + gqa * 3 + D), 3)
    q = mx.random.normal((1, q_len, N_Q_HEADS, D), key=keys[0]).astype(dtype).transpose(0, 2, 1, 3)
    k = mx.random.normal((1, Hkv, S + 256, D), key=keys[1]).astype(dtype)[:, :, :S]
    v = mx.random.normal((1, Hkv, S + 256, D), key=keys[2]).astype(dtype)[:, :, :S]
    mx.eval(q, k, v)
    row = dict(cache_len=S, q_len=q_len, gqa=gqa, head_dim=D, n_q_heads=N_Q_HEADS)
    row["reference_ms"] = timed(lambda: reference(q, k, v, scale, offset, causal_point), iters)
    if metal:
        got = metal_block_attention(q, k, v, scale, offset, causal_point)
        if got is None:
            row["kernel_ms"] = None  # unsupported shape or the kernel was disabled (see the warning)
        else:
            err = mx.abs(got - reference(q, k, v, scale, offset, causal_point)).max().item()
            row["kernel_ms"] = timed(lambda: metal_block_attention(q, k, v, scale, offset, causal_point), iters)
            row["kernel_max_abs_err"] = err
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench_attention.json")
    parser.add_argument("--lengths", default=",".join(map(str, LENGTHS)))
    parser.add_argument("--q-lens", default=",".join(map(str, Q_LENS)))
    parser.add_argument("--gqa", default=",".join(map(str, GQAS)))
    parser.add_argument("--head-dims", default=",".join(map(str, HEAD_DIMS)))
    parser.add_argument("--dtype", default="float16")
    parser.add_argument("--iters", type=int, default=50)
    args = parser.parse_args()
    ints = lambda s: [int(x) for x in s.split(",")]  # noqa: E731
    dtype = getattr(mx, args.dtype)
    metal = mx.metal.is_available()
    info = machine()
    print(f"machine: {info}")
    if not metal:
        print("No Metal back-end: timing the reference path (SDPA + boolean mask) only; the kernel needs a Mac.")
    print(f"{'cache':>6} {'q_len':>5} {'gqa':>3} {'D':>4} {'ref ms':>9} {'kernel ms':>9} {'speedup':>7}")
    rows = []
    for D in ints(args.head_dims):
        for gqa in ints(args.gqa):
            for q_len in ints(args.q_lens):
                for S in ints(args.lengths):
                    r = bench_one(S, q_len, gqa, D, dtype, args.iters, metal)
                    rows.append(r)
                    kern = r.get("kernel_ms")
                    speed = f"{r['reference_ms'] / kern:6.2f}x" if kern else "      -"
                    kern_s = f"{kern:9.3f}" if kern else "        -"
                    print(f"{S:>6} {q_len:>5} {gqa:>3} {D:>4} {r['reference_ms']:9.3f} {kern_s} {speed}", flush=True)
    with open(args.out, "w") as f:
        json.dump({"machine": info, "dtype": args.dtype, "metal": metal, "rows": rows}, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
