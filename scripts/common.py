"""Shared by the benchmark scripts: machine description and result saving."""

import json
import os
import platform
import time
from pathlib import Path

import mlx.core as mx

from mlx_sbd.backend import fast_blas_loaded, has_metal


def machine() -> dict:
    blas = {True: "optimised (preloaded)", False: "reference BLAS bundled with mlx-cpu", None: "platform default"}
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "backend": "metal" if has_metal() else "cuda" if getattr(getattr(mx, "cuda", None), "is_available", bool)() else "cpu",
        "blas": blas[fast_blas_loaded()],
        "mlx": mx.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M"),
        **({"device": mx.metal.device_info().get("device_name", "?")} if has_metal() else {}),
    }


def save(results: dict, out: str) -> None:
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(results, indent=2))
    print(f"raw results: {out}")
