"""The Linux BLAS trap (see README, Linux speed): detection and the automatic OpenBLAS preload.

Each case runs in a fresh interpreter, because what BLAS serves MLX is fixed when the process starts.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from mlx_sbd.backend import OPENBLAS

linux_mlx_cpu = pytest.mark.skipif(
    not sys.platform.startswith("linux") or not list(Path(sys.prefix).glob("lib/python*/site-packages/mlx_cpu.libs")),
    reason="needs the mlx-cpu wheel on Linux",
)
needs_openblas = pytest.mark.skipif(not os.path.exists(OPENBLAS), reason="libopenblas0-pthread not installed")


def run(code: str, **env) -> str:
    base = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "MLX_SBD_NO_PRELOAD")}
    out = subprocess.run([sys.executable, "-c", code], env={**base, **env}, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip().splitlines()[-1]


CHECK = "import numpy, mlx_sbd.backend as b; print(b.fast_blas_loaded())"  # numpy brings its own OpenBLAS


@linux_mlx_cpu
def test_bundled_reference_blas_is_detected_despite_numpys_openblas():
    assert run(CHECK, MLX_SBD_NO_PRELOAD="1") == "False"


@linux_mlx_cpu
@needs_openblas
def test_preloaded_openblas_is_detected():
    assert run(CHECK, MLX_SBD_NO_PRELOAD="1", LD_PRELOAD=OPENBLAS) == "True"


@linux_mlx_cpu
@needs_openblas
def test_start_up_reexecs_with_openblas():
    code = "from mlx_sbd.backend import preload_openblas_and_reexec as p; p(); " + CHECK
    assert run(code) == "True"


@linux_mlx_cpu
def test_warns_once_on_reference_blas():
    code = ("import warnings, mlx_sbd.backend as b; warnings.simplefilter('always');\n"
            "with warnings.catch_warnings(record=True) as w:\n b.warn_if_slow_blas(); b.warn_if_slow_blas()\n"
            "print(len(w), 'reference BLAS' in str(w[0].message))")
    assert run(code, MLX_SBD_NO_PRELOAD="1") == "1 True"


@linux_mlx_cpu
@needs_openblas
def test_this_test_run_itself_uses_openblas():
    """The repo conftest re-ran pytest with OpenBLAS preloaded (CI speed depends on it)."""
    from mlx_sbd.backend import fast_blas_loaded

    assert fast_blas_loaded() is True
