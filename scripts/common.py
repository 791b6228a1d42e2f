"""Shared by the benchmark scripts: machine description and result saving."""

import json
import os
import platform
import statistics
import time
from pathlib import Path

import mlx.core as mx

from mlx_sbd.adapter import base_layers
from mlx_sbd.backend import fast_blas_loaded, has_metal


def machine() -> dict:
    blas = {True: "optimised (preloaded)", False: "reference BLAS bundled with mlx-cpu", None: "platform default"}
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "backend": "metal" if has_metal() else "cuda" if getattr(getattr(mx, "cuda", None), "is_available", bool)()
        else "cpu",
        "blas": blas[fast_blas_loaded()],
        "mlx": mx.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M"),
        **({"device": mx.metal.device_info().get("device_name", "?")} if has_metal() else {}),
    }


def save(results: dict, out: str) -> None:
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(results, indent=2))
    print(f"raw results: {out}")


def time_mlx_lm_forward(model, cache, rows: int, repeats: int) -> float:
    """Median seconds of mlx_lm's own causal forward of `rows` tokens (its attention, its mask; the base's layers,
    adapter.base_layers) over `cache`, left as it was; the first run warms up and is not counted."""
    x = mx.ones((1, rows), mx.int32)
    times = []
    with base_layers(model) as lm:
        for i in range(repeats + 1):
            tic = time.perf_counter()
            mx.eval(lm(x, cache=cache).argmax(axis=-1))
            if i:
                times.append(time.perf_counter() - tic)
            for c in cache:
                c.trim(rows)
    return statistics.median(times)
