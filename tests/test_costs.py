"""time(rows) (costs.py): interpolation against numpy in rows and in context, and the per-device cache (each
context bucket measured once, when a context first needs it, then read)."""

import numpy as np
import pytest

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


def test_context_cost_interpolates_in_context_and_never_decreases():
    short = {1: 1.0, 8: 2.0}
    long = {1: 1.5, 8: 1.8}  # 8 rows "cheaper" over the longer context: timing noise, held at the shorter one's
    cost = costs.ContextCost({256: short, 1024: long})
    for rows in (1, 4, 8):
        at = [costs.RowCost(short)(rows), max(costs.RowCost(short)(rows), costs.RowCost(long)(rows))]
        for context in (0, 256, 300, 640, 1024):
            assert np.isclose(cost(rows, context), np.interp(context, [256, 1024], at))
        # past the last bucket, and nothing to measure it with: the last slope continues
        assert np.isclose(cost(rows, 2048), at[1] + (at[1] - at[0]) * (2048 - 1024) / (1024 - 256))


def tiny(path):
    return load_model(make_tiny_model(path, hidden_size=32, num_hidden_layers=1, intermediate_size=64,
                                      num_attention_heads=2, num_key_value_heads=1))


def test_row_cost_is_measured_once_per_device_and_model(tmp_path, monkeypatch):
    monkeypatch.setenv("MLX_SBD_CACHE", str(tmp_path))
    model = tiny(tmp_path / "m")
    calls = []
    real = costs.measure
    monkeypatch.setattr(costs, "measure", lambda *a, **k: calls.append(k["context"]) or real(*a, **k))
    first = costs.row_cost(model)
    second = costs.row_cost(model)
    assert calls == [costs.CONTEXTS[0]] and first.to_dict() == second.to_dict()
    assert first.tables[costs.CONTEXTS[0]].rows == list(costs.ROWS)
    assert len(list((tmp_path / "rows_time").glob("*.json"))) == 1
    costs.row_cost(model, refresh=True)
    assert len(calls) == 2
    (next((tmp_path / "rows_time").glob("*.json"))).write_text("{broken")  # a torn file: measured again
    costs.row_cost(model)
    assert len(calls) == 3


def test_a_longer_context_measures_its_bucket_once(tmp_path, monkeypatch):
    """A context past the first bucket measures the next one (with a cache of that many keys), once: the file keeps
    it for the next process, and contexts below it measure nothing more."""
    monkeypatch.setenv("MLX_SBD_CACHE", str(tmp_path))
    model = tiny(tmp_path / "m")
    calls, sizes = [], []
    real_measure, real_fill = costs.measure, costs.filled_cache
    monkeypatch.setattr(costs, "measure", lambda *a, **k: calls.append(k["context"]) or real_measure(*a, **k))
    monkeypatch.setattr(costs, "filled_cache", lambda m, c: sizes.append(c) or real_fill(m, c))
    cost = costs.row_cost(model)
    cost(4, 100)
    cost(4, costs.CONTEXTS[0])
    assert calls == [costs.CONTEXTS[0]]
    cost(4, costs.CONTEXTS[0] + 1)
    cost(8, costs.CONTEXTS[1] - 1)
    assert calls == list(costs.CONTEXTS[:2]) and sizes == calls
    cache = costs.filled_cache(model, 300)
    assert all(c.offset == 300 for c in cache)
    again = costs.row_cost(model)  # a new process: both buckets from the file
    again(4, costs.CONTEXTS[1])
    assert calls == list(costs.CONTEXTS[:2]) and again.to_dict() == cost.to_dict()


def test_per_model_values_die_with_their_model(tmp_path, monkeypatch):
    """Learned acceptance and time(rows) belong to one model object: a model loaded after another is freed (and
    often given its id) starts fresh instead of inheriting the freed one's estimates."""
    import gc

    from mlx_sbd.drafting import learned

    monkeypatch.setenv("MLX_SBD_CACHE", str(tmp_path))
    folder = make_tiny_model(tmp_path / "m", hidden_size=32, num_hidden_layers=1, intermediate_size=64,
                             num_attention_heads=2, num_key_value_heads=1)
    from mlx_sbd import drafting
    gc.collect()  # an earlier test's model that is garbage but not yet collected would leave during this test
    before = len(costs._memo._items), len(drafting._learned._items)  # other tests' models may still be alive
    seen_ids, reused = set(), 0
    for _ in range(12):
        model = load_model(folder)
        reused += id(model) in seen_ids
        seen_ids.add(id(model))
        assert learned(model, 8) == {}, "a new model inherited a freed model's acceptance estimates"
        learned(model, 8)["sbd"] = "estimates of this model"
        assert learned(model, 8)["sbd"] == "estimates of this model"  # kept while the model lives
        assert costs.cached_row_cost(model) is costs.cached_row_cost(model)
        del model
        gc.collect()
    assert (len(costs._memo._items), len(drafting._learned._items)) == before  # nothing kept for a freed model
    print(f"ids reused: {reused} of 12")



def true_time(rows):
    return 0.1 + 0.05 * rows


def test_a_table_the_forwards_disagree_with_is_measured_again():
    """After CHECK_FORWARDS forwards over a bucket, a median ratio (seen / table) off by more than CHECK_TOLERANCE
    measures that bucket again and saves it; within it, or once checked, nothing is measured. Outliers (stalls) do
    not trigger it."""
    measured, saved = [], []

    def measure(context):
        measured.append(context)
        return {r: true_time(r) for r in (1, 2, 4, 8, 16, 32)}

    stale = costs.ContextCost({256: {1: 0.1, 32: 0.1}, 1024: {1: 0.1, 32: 0.1}}, measure=measure, save=saved.append)
    assert stale(16, 300) == 0.1  # the stale table prices 16 rows like 1
    for i in range(2 * costs.CHECK_FORWARDS):
        stale.observe(16, 300, true_time(16), predraft=True)  # pre-drafting's masks: not what the table measures
    assert not measured
    for i in range(costs.CHECK_FORWARDS):
        assert not measured
        stale.observe(16, 300, true_time(16))  # over 300 cached tokens: the 256 bucket's check
    assert measured == [256] and saved == [stale] and stale.remeasured == [256]
    assert np.isclose(stale(16, 256), true_time(16)) and stale.tables[1024](16) == 0.1  # only the bucket seen
    for i in range(3 * costs.CHECK_FORWARDS):
        stale.observe(16, 300, 10.0)  # once checked, a bucket is not measured again in this process
    assert measured == [256]
    # 2000 cached tokens: the 1024 bucket's check; a median within the tolerance, with two stalls, measures nothing
    ok = costs.ContextCost({c: {1: 1.0, 8: 2.0} for c in (256, 1024, 4096)}, measure=measure)
    for seconds in [2.0 * 1.2] * (costs.CHECK_FORWARDS - 2) + [50.0, 50.0]:
        ok.observe(8, 2000, seconds)
    assert measured == [256] and ok.checks == {1024: None}


def test_a_table_off_by_a_common_factor_is_scaled_and_one_off_in_shape_is_measured_again():
    """Forwards at row counts SHAPE_SPAN apart that all see the table off by one factor (the device's speed moved)
    scale the bucket by it: no forwards spent measuring inside an answer, the prices then true, saved. When their
    ratios differ by row count (the table's shape is wrong) or one row count was seen, the bucket is measured."""
    measured, saved = [], []

    def measure(context):
        measured.append(context)
        return {r: true_time(r) for r in costs.ROWS}

    fast_day = {256: {r: 0.6 * true_time(r) for r in costs.ROWS}}
    cost = costs.ContextCost(fast_day, measure=measure, save=saved.append)
    version = cost.version
    for i in range(costs.CHECK_FORWARDS):
        rows = (5, 9)[i % 2]
        cost.observe(rows, 256, true_time(rows) * (1 + 0.02 * (i % 3)))  # a little noise on top
    assert measured == [] and cost.rescaled == [256] and cost.remeasured == [] and saved == [cost]
    assert cost.version > version  # auto reads its prices again
    assert [cost(r, 256) for r in (1, 3, 16, 32)] == pytest.approx([true_time(r) for r in (1, 3, 16, 32)], rel=0.03)

    flat = costs.ContextCost({256: {1: 0.1, 32: 0.1}}, measure=measure)  # prices 9 rows like 5: wrong in shape
    for i in range(costs.CHECK_FORWARDS):
        rows = (5, 9)[i % 2]
        flat.observe(rows, 256, true_time(rows))
    assert measured == [256] and flat.remeasured == [256] and flat.rescaled == []
    close = costs.ContextCost(fast_day, measure=measure)  # 5 and 6 rows: too close to tell the shape
    for i in range(costs.CHECK_FORWARDS):
        rows = (5, 6)[i % 2]
        close.observe(rows, 256, true_time(rows))
    assert measured == [256, 256] and close.remeasured == [256]


def test_auto_follows_a_table_measured_again():
    """A stale table that prices rows as free makes auto send a long mask block; once the forwards it sees have the
    table measured again, auto makes the choice the true costs call for."""
    from mlx_sbd.drafting import Drafter

    cost = costs.ContextCost({256: {1: 0.1, 32: 0.1}}, measure=lambda c: {r: true_time(r) for r in costs.ROWS})
    prior = [0.6, 0.5, 0.4]
    drafter = Drafter("auto", has_adapter=True, cost=cost, block_size=16, sbd_prior=prior)
    fresh = Drafter("auto", has_adapter=True, cost=lambda rows, context=0: true_time(rows), block_size=16,
                    sbd_prior=prior)
    tokens, masked = [5, 6, 7], [9] * 15

    def rows_of(plan):
        drafts, _, k, predraft = plan
        return 1 + len(drafts) + (len(drafts) + 1 if predraft else 1) * k

    chosen = []
    for _ in range(costs.CHECK_FORWARDS + 1):
        chosen.append(rows_of(drafter.plan(tokens, masked, 15, 1, 100, 256)))
        cost.observe(chosen[-1], 256, true_time(chosen[-1]))
    best = rows_of(fresh.plan(tokens, masked, 15, 1, 100, 256))
    assert chosen[0] > 2 * best and chosen[-1] == best


def test_one_row_count_and_an_array_of_them_price_alike():
    """RowCost prices one count in Python (every verified forward's check) and arrays with numpy (auto's plan):
    the two agree inside the table, below it and past it (the last segment's slope continued)."""
    cost = costs.RowCost({1: 0.06, 2: 0.07, 4: 0.09, 8: 0.1, 16: 0.14, 32: 0.2})
    rows = np.arange(0, 70)
    many = cost(rows)
    assert [cost(int(r)) for r in rows] == pytest.approx(list(many), abs=1e-15)
    assert cost(64) == pytest.approx(0.2 + (0.2 - 0.14) * 2)  # past 32: the 16-32 slope
