"""The CPU decode attention (attention.sdpa / folded_attention: grouped-query heads folded into the rows) against a
numpy re-derivation and against MLX's own SDPA, over the masks decode forwards use."""

import mlx.core as mx
import numpy as np
import pytest

from mlx_sbd import attention
from mlx_sbd.masks import inference_mask


def numpy_attention(q, k, v, scale, mask):
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    groups = q.shape[1] // k.shape[1]
    k, v = np.repeat(k, groups, axis=1), np.repeat(v, groups, axis=1)  # query head h reads kv head h // groups
    s = scale * q @ k.swapaxes(-1, -2)
    if mask is not None:
        s = np.where(np.asarray(mask), s, -np.inf)
    w = np.exp(s - s.max(-1, keepdims=True))
    return (w / w.sum(-1, keepdims=True)) @ v


@pytest.mark.parametrize("heads,kv_heads", [(9, 3), (4, 1), (8, 2), (4, 4)])
@pytest.mark.parametrize("rows,cached", [(1, 40), (5, 0), (9, 37), (17, 200)])
def test_decode_attention_is_attention(heads, kv_heads, rows, cached):
    rng = np.random.default_rng(rows * 100 + heads)
    q = mx.array(rng.normal(size=(1, heads, rows, 16)).astype(np.float32))
    k, v = (mx.array(rng.normal(size=(1, kv_heads, cached + rows, 16)).astype(np.float32)) for _ in range(2))
    masks = {"none": None, "causal": "causal", "block": inference_mask(rows, cached, max(rows - 3, 0))}
    for name, mask in masks.items():
        dense = None if mask is None else (inference_mask(rows, cached, rows) if mask == "causal" else mask)
        got = attention.sdpa(q, k, v, 0.25, mask)
        assert np.allclose(np.asarray(got), numpy_attention(q, k, v, 0.25, dense), atol=1e-5), name
        # on the CPU the same arithmetic as MLX's own SDPA (its fallback), so the same numbers
        same = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.25, mask=mask)
        assert np.allclose(np.asarray(got), np.asarray(same), atol=1e-6), name


def test_folded_attention_in_half_precision():
    rng = np.random.default_rng(0)
    q = mx.array(rng.normal(size=(1, 6, 9, 32)), mx.float16)
    k, v = (mx.array(rng.normal(size=(1, 2, 50, 32)), mx.float16) for _ in range(2))
    mask = inference_mask(9, 41, 4)
    got = attention.folded_attention(q, k, v, 32 ** -0.5, mask)
    assert got.dtype == mx.float16
    assert np.allclose(np.asarray(got.astype(mx.float32)), numpy_attention(q, k, v, 32 ** -0.5, mask), atol=2e-2)


def windowed(dense, rows, mask_from, window):
    """The window re-derived on a dense mask [T, S]: mask rows (from `mask_from`) lose every cached key before the
    last `window` ones (S - T cached keys, then the forward's own rows)."""
    dense = np.array(dense)
    first = dense.shape[1] - rows - window
    if first > 0:
        dense[mask_from:, :first] = False
    return dense


@pytest.mark.parametrize("heads,kv_heads", [(9, 3), (4, 4)])
@pytest.mark.parametrize("cached,window", [(40, 8), (40, 39), (40, 40), (40, 100), (300, 64)])
def test_mask_rows_attend_to_their_window(heads, kv_heads, cached, window):
    """Verified forwards' masks with a window (attention.DRAFT_WINDOW): the causal rows see every cached key, the mask
    rows only the last `window`; both layouts (the linear BlockMask, pre-drafting's SpanMask) against numpy."""
    from mlx_sbd.masks import predraft_spans, span_mask

    rng = np.random.default_rng(cached + window + heads)
    pending, m, k = 1, 2, 3
    _, visible, lo, hi = predraft_spans(cached, pending, m, k)
    n_keys = cached + visible.size
    layouts = {"linear": (pending + m + k, attention.BlockMask(pending + m, window=window),
                          inference_mask(pending + m + k, cached, pending + m)),
               "predraft": (visible.size, attention.make_span_mask(visible, lo, hi, n_keys, pending + m, window),
                            span_mask(visible, lo, hi, n_keys))}
    for name, (rows, mask, dense) in layouts.items():
        q = mx.array(rng.normal(size=(1, heads, rows, 16)).astype(np.float32))
        k_, v = (mx.array(rng.normal(size=(1, kv_heads, cached + rows, 16)).astype(np.float32)) for _ in range(2))
        got = np.asarray(attention.attention(q, k_, v, 0.25, mask))
        want = numpy_attention(q, k_, v, 0.25, windowed(dense, rows, pending + m, window))
        assert np.allclose(got, want, atol=1e-5), name
        if window < cached:  # the test can tell: without the window the mask rows differ
            assert not np.allclose(got, numpy_attention(q, k_, v, 0.25, dense), atol=1e-3), name
