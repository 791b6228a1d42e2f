"""time(rows) (costs.py): interpolation against numpy, and the per-device cache (measured once, then read)."""

import numpy as np

from mlx_sbd import costs
from mlx_sbd.loading import load_model
from mlx_sbd.tiny import make_tiny_model


def test_row_cost_interpolates_and_never_decreases():
    times = {1: 1.0, 2: 0.9, 4: 1.5, 8: 2.0}  # 2 rows "faster" than 1: timing noise
    cost = costs.RowCost(times)
    mono = np.maximum.accumulate([1.0, 0.9, 1.5, 2.0])
    for r in [1, 2, 3, 5, 8]:
        assert np.isclose(cost(r), np.interp(r, [1, 2, 4, 8], mono))
    assert np.isclose(cost(12), 2.0 + (2.0 - 1.5) / 4 * 4)  # past the last point: the last slope
    assert cost(0) == 1.0


def test_row_cost_is_measured_once_per_device_and_model(tmp_path, monkeypatch):
    monkeypatch.setenv("MLX_SBD_CACHE", str(tmp_path))
    model = load_model(make_tiny_model(tmp_path / "m", hidden_size=32, num_hidden_layers=1, intermediate_size=64,
                                       num_attention_heads=2, num_key_value_heads=1))
    calls = []
    real = costs.measure
    monkeypatch.setattr(costs, "measure", lambda *a, **k: calls.append(1) or real(*a, **k))
    first = costs.row_cost(model, context=16)
    second = costs.row_cost(model, context=16)
    assert len(calls) == 1 and first.times == second.times and first.rows == list(costs.ROWS)
    assert len(list((tmp_path / "rows_time").glob("*.json"))) == 1
    costs.row_cost(model, context=16, refresh=True)
    assert len(calls) == 2
    (next((tmp_path / "rows_time").glob("*.json"))).write_text("{broken")  # a torn file: measured again
    costs.row_cost(model, context=16)
    assert len(calls) == 3
