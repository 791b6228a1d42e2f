"""The custom Metal kernel for span-masked attention (decode step and verified forwards), and when it may run.

The kernel takes the mask per query row (masks.span_mask): row t sees keys j < visible[t] and lo[t] <= j < hi[t].
`metal_span_attention` runs it for any such layout (pre-drafting's blocks at shared positions included);
`metal_block_attention` is the decode step's special case (masks.inference_mask as spans, `block_spans`).
metal/block_attention.metal holds the kernel body; this module owns its launch geometry, the merge of the
key splits, the shapes it supports, and the fallback: both functions return None (the caller then runs
mx.fast.scaled_dot_product_attention with the dense mask) without Metal, for unsupported shapes or dtypes, or
when the kernel fails to build or to match the reference on a Mac (warned once).
The emulator test (tests/test_metal_kernel.py) runs the same source and this module's geometry on Linux.
"""

import importlib.resources
import math
import warnings
from functools import lru_cache
from typing import Optional, Set, Tuple

import mlx.core as mx

NAME = "sbd_block_attention"
INPUT_NAMES = ["q", "k", "v", "visible", "lo", "hi", "scale"]
OUTPUT_NAMES = ["out", "lse"]
THREADS = 128  # 4 simdgroups x 32 lanes, as in the kernel
ROWS_PER_THREADGROUP = 32  # 4 simdgroups x 8 rows
HEAD_DIMS = (64, 128)
DTYPES = (mx.float16, mx.bfloat16, mx.float32)
MAX_Q_LEN = 64
KEYS_PER_SPLIT = 1024  # long caches are cut into key splits so enough threadgroups run in parallel
MAX_SPLITS = 32

_kernel = None
_checked: Set[Tuple[mx.Dtype, int]] = set()  # (dtype, head dim) pairs whose build matched SDPA
_disabled = False  # set by the first failed check: one warning, then the reference path for good


def kernel_source() -> str:
    return importlib.resources.files("mlx_sbd.metal").joinpath("block_attention.metal").read_text()


def n_splits_for(n_keys: int) -> int:
    return max(1, min(MAX_SPLITS, math.ceil(n_keys / KEYS_PER_SPLIT)))


def launch(q_shape, k_shape, n_splits: int) -> dict:
    """Grid, threadgroup, template and outputs for q [B, Hq, T, D] over k [B, Hkv, S, D] in n_splits splits."""
    B, Hq, T, D = q_shape
    Hkv = k_shape[1]
    row_tiles = math.ceil((Hq // Hkv) * T / ROWS_PER_THREADGROUP)
    return dict(
        grid=(THREADS * row_tiles, B * Hkv, n_splits),
        threadgroup=(THREADS, 1, 1),
        template=[("D", D)],
        output_shapes=[(n_splits, B, Hq, T, D), (n_splits, B, Hq, T)],
        output_dtypes=[mx.float32, mx.float32],
    )


def span_inputs(visible: mx.array, lo: mx.array, hi: mx.array, scale: float):
    """int32 arrays (read through their strides) and a 0-d scale: new values never recompile."""
    return [visible.astype(mx.int32), lo.astype(mx.int32), hi.astype(mx.int32), mx.array(scale, mx.float32)]


@lru_cache(maxsize=8)  # every layer of a decode step asks for the same spans: build them once
def block_spans(q_len: int, offset: int, causal_point: int) -> Tuple[mx.array, mx.array, mx.array]:
    """masks.inference_mask as spans: row t < causal_point sees keys <= offset + t, the block's rows see all
    offset + q_len keys; no own span (lo = hi = 0)."""
    t = mx.arange(q_len, dtype=mx.int32)
    visible = mx.where(t < causal_point, offset + t + 1, offset + q_len).astype(mx.int32)
    empty = mx.zeros((q_len,), mx.int32)
    return visible, empty, empty


def merge_splits(out: mx.array, lse: mx.array, dtype: mx.Dtype) -> mx.array:
    """out [splits, B, Hq, T, D] (each normalised over its split), lse [splits, B, Hq, T] -> [B, Hq, T, D]."""
    if out.shape[0] == 1:
        return out[0].astype(dtype)
    w = mx.exp(lse - lse.max(axis=0))  # splits with no allowed key have lse = -3e38: weight 0
    return ((w[..., None] * out).sum(axis=0) / w.sum(axis=0)[..., None]).astype(dtype)


def supported(q: mx.array, k: mx.array, v: mx.array, offset: int) -> bool:
    """The decode step: shapes the kernel covers, with offset + T keys."""
    return supported_shapes(q, k, v) and k.shape[2] == offset + q.shape[2]


def supported_spans(q: mx.array, k: mx.array, v: mx.array, visible, lo, hi) -> bool:
    """Any span layout: shapes the kernel covers, one integer visible/lo/hi entry per query row."""
    T = q.shape[2] if q.ndim == 4 else -1
    return supported_shapes(q, k, v) and all(
        isinstance(a, mx.array) and a.shape == (T,) and mx.issubdtype(a.dtype, mx.integer) for a in (visible, lo, hi)
    )


def supported_shapes(q: mx.array, k: mx.array, v: mx.array) -> bool:
    B, Hq, T, D = q.shape if q.ndim == 4 else (0, 0, 0, 0)
    return (
        q.ndim == 4
        and k.ndim == 4
        and k.shape == v.shape
        and q.dtype in DTYPES
        and k.dtype == q.dtype
        and v.dtype == q.dtype
        and D in HEAD_DIMS
        and k.shape[3] == D
        and k.shape[0] == B
        and Hq % k.shape[1] == 0
        and 1 <= T <= MAX_Q_LEN
        and k.shape[2] >= 1
    )


def _run(q, k, v, scale: float, visible, lo, hi) -> mx.array:
    global _kernel
    if _kernel is None:
        _kernel = mx.fast.metal_kernel(
            name=NAME,
            input_names=INPUT_NAMES,
            output_names=OUTPUT_NAMES,
            source=kernel_source(),
            ensure_row_contiguous=False,
        )
    out, lse = _kernel(
        inputs=[q, k, v, *span_inputs(visible, lo, hi, scale)],
        **launch(q.shape, k.shape, n_splits_for(k.shape[2])),
    )
    return merge_splits(out, lse, q.dtype)


def _check_once(dtype: mx.Dtype, D: int) -> bool:
    """Build the kernel for (dtype, D) and compare it with SDPA on a small GQA pre-drafting layout (causal rows,
    then three mask blocks at shared positions, each seeing a prefix and its own span); warn once if it fails."""
    global _disabled
    if _disabled or (dtype, D) in _checked:
        return not _disabled
    from .masks import predraft_spans, span_mask

    key = mx.random.key(0)
    offset, S, scale = 1484, 1500, D**-0.5
    _, visible, lo, hi = predraft_spans(offset, 2, 2, 4)  # 2 pending + 2 drafts + 3 blocks of 4: 16 rows
    q = mx.random.normal((1, 4, 16, D), key=key).astype(dtype)
    kv = mx.random.normal((2, 1, 2, 2100, D), key=mx.random.split(key)[0]).astype(dtype)
    k, v = kv[0, :, :, :S], kv[1, :, :, :S]  # cache-like views with spare capacity, two key splits
    try:
        got = _run(q, k, v, scale, visible, lo, hi)
        want = mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=span_mask(visible, lo, hi, S))
        err = mx.abs(got.astype(mx.float32) - want.astype(mx.float32)).max().item()
        ok = err <= (1e-4 if dtype == mx.float32 else 2e-2)
        problem = f"differs from the reference by {err:.3g}"
    except Exception as e:  # a Metal compiler or runtime error: fall back, never crash decoding
        ok, problem = False, f"failed to build or run ({e})"
    if ok:
        _checked.add((dtype, D))
        return True
    _disabled = True
    warnings.warn(
        f"mlx-sbd Metal attention kernel {problem} for {dtype}, head dim {D}; "
        "using mx.fast.scaled_dot_product_attention from now on.",
        stacklevel=3,
    )
    return False


def metal_span_attention(q, k, v, scale, visible, lo, hi) -> Optional[mx.array]:
    """q [B, Hq, T, D]; k, v [B, Hkv, S, D] (cache views, may be strided); visible, lo, hi [T] integer arrays
    -> [B, Hq, T, D] in q's dtype.

    Row t sees key j iff j < visible[t] or lo[t] <= j < hi[t] (masks.span_mask); every row must see a key (one
    that sees none gets 0, SDPA's output is undefined). None means: use the reference path.
    """
    if not mx.metal.is_available() or not supported_spans(q, k, v, visible, lo, hi):
        return None
    if not _check_once(q.dtype, q.shape[3]):
        return None
    return _run(q, k, v, scale, visible, lo, hi)


def metal_block_attention(q, k, v, scale, offset, causal_point) -> Optional[mx.array]:
    """q [B, Hq, T, D]; k, v [B, Hkv, offset + T, D] (cache views, may be strided) -> [B, Hq, T, D] in q's dtype.

    New query t sees key j iff j <= offset + t or t >= causal_point. None means: use the reference path.
    """
    if not mx.metal.is_available() or not supported(q, k, v, offset):
        return None
    return metal_span_attention(q, k, v, scale, *block_spans(q.shape[2], offset, causal_point))
