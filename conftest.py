"""Repo-wide pytest set-up: OpenBLAS on Linux (see mlx_sbd.backend) and the `slow` marker.

`pytest` runs the fast tests; `pytest --runslow` (what CI and the README run) runs everything.
"""

import pytest

from mlx_sbd.backend import preload_openblas_and_reexec, should_preload_openblas


def pytest_configure(config):
    if should_preload_openblas():
        # pytest already redirected fds 1 and 2 to its capture files; give the re-run the real terminal.
        capture = config.pluginmanager.getplugin("capturemanager")
        if capture is not None:
            capture.stop_global_capturing()
        preload_openblas_and_reexec()


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", help="also run tests marked slow (real model, training)")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
