"""What the compute back-end can do: Metal or CPU, the dtype to compute in, and the Linux BLAS trap.

On MLX's CPU back-end bf16/fp16 matmuls are ~30x slower than float32, and the mlx-cpu wheel bundles the
reference BLAS, which makes multi-token forwards (the whole point of SBD) ~20x slower than OpenBLAS
(measured, see the README). The CLI preloads OpenBLAS when it is installed; library users get one warning.
"""

import os
import sys
import warnings
from typing import Optional

import mlx.core as mx

OPENBLAS = "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0"
FAST_BLAS_NAMES = ("libopenblas", "libmkl", "libblis")
_warned = False


def has_metal() -> bool:
    return mx.metal.is_available()


def compute_dtype(requested: Optional[str] = None) -> Optional[mx.Dtype]:
    """The dtype to cast floating weights to: the request, else float32 on CPU, else None (keep checkpoint's)."""
    if requested:
        try:
            return getattr(mx, requested)
        except AttributeError:
            from .errors import SBDError

            raise SBDError(f"unknown dtype '{requested}'; use float32, float16 or bfloat16") from None
    return None if has_metal() else mx.float32


def fast_blas_loaded() -> Optional[bool]:
    """On Linux: False when MLX runs on the reference BLAS bundled with mlx-cpu (no optimised BLAS preloaded
    in front of it), else True. None elsewhere.

    numpy's own OpenBLAS (libscipy_openblas, prefixed symbols) is mapped into most processes but never serves
    MLX, so it does not count.
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        with open("/proc/self/maps") as f:
            libs = {line.split()[-1].lower() for line in f if "/" in line}
    except OSError:
        return None
    if not any("mlx_cpu.libs/libblas" in lib for lib in libs):
        return True  # MLX linked against some other BLAS (e.g. built from source)
    return any(
        name in lib for lib in libs for name in FAST_BLAS_NAMES if "scipy_openblas" not in lib and "numpy" not in lib
    )


def warn_if_slow_blas() -> None:
    global _warned
    if _warned or has_metal() or fast_blas_loaded() is not False:
        return
    _warned = True
    fix = (
        f"run with LD_PRELOAD={OPENBLAS}"
        if os.path.exists(OPENBLAS)
        else f"apt-get install libopenblas0-pthread, then run with LD_PRELOAD={OPENBLAS}"
    )
    warnings.warn(
        "MLX is using the reference BLAS bundled with mlx-cpu: multi-token forwards run ~20x slower. "
        f"Fix: {fix}",
        stacklevel=2,
    )


def should_preload_openblas() -> bool:
    """Linux, OpenBLAS installed, MLX still on its reference BLAS, and the user did not opt out."""
    return (
        sys.platform.startswith("linux")
        and not os.environ.get("MLX_SBD_NO_PRELOAD")
        and os.path.exists(OPENBLAS)
        and fast_blas_loaded() is False
    )


def preload_openblas_and_reexec() -> None:
    """CLI (and test) start-up on Linux: re-run this very command with OpenBLAS preloaded when it is installed
    and not serving MLX yet (see should_preload_openblas).

    MLX resolves BLAS symbols when it is loaded, so preloading is the only way to swap it. Set
    MLX_SBD_NO_PRELOAD=1 to opt out.
    """
    if not should_preload_openblas():
        return
    env = dict(os.environ, MLX_SBD_NO_PRELOAD="1")
    env["LD_PRELOAD"] = " ".join(p for p in (OPENBLAS, os.environ.get("LD_PRELOAD", "")) if p)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
