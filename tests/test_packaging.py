"""A non-editable install (what `pip install mlx-sbd` gives users) carries every module and the shipped data."""

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_wheel_holds_every_module_the_kernel_and_the_default_adapter(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path),
                    str(ROOT)], check=True, capture_output=True)
    (wheel,) = tmp_path.glob("mlx_sbd-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    sources = {str(p.relative_to(ROOT)) for p in (ROOT / "mlx_sbd").rglob("*.py")}
    assert sources <= names, sorted(sources - names)
    assert "mlx_sbd/metal/block_attention.metal" in names
    adapter = {str(p.relative_to(ROOT)) for p in (ROOT / "mlx_sbd" / "adapters").rglob("*") if p.is_file()}
    assert {f"mlx_sbd/adapters/{folder}/{f}" for f in
            ("adapters.safetensors", "adapter_config.json", "sbd.safetensors", "README.md")
            for folder in ("smollm2-135m-instruct-sbd-gated", "smollm2-135m-instruct-sbd")} <= adapter <= names
