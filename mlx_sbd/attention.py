"""Attention for the SBD forward: arbitrary boolean masks, the block-masked decode step and verified layouts.

The lossy decode step's mask depends on two scalars (`offset`, `causal_point`, see masks.inference_mask); a
verified layout's (pre-drafting's several blocks at shared positions) on three per-row arrays (SpanMask: a visible
prefix and the row's own block span, masks.span_mask). On a Mac the custom Metal kernel computes both without
materialising the mask; everywhere else (and for shapes the kernel does not cover) `sdpa` runs with the
equivalent boolean mask: mx.fast.scaled_dot_product_attention, or on the CPU for a decode forward of a
grouped-query model, the same computation with the query-head groups folded into the rows (`folded_attention`).
"""

from dataclasses import dataclass, field
from typing import Optional, Union

import mlx.core as mx

from .masks import inference_mask, span_mask
from .metal_kernel import metal_block_attention, metal_span_attention


# How many cached keys a verified forward's mask rows attend to (None: all). Mask rows only draft: the causal rows
# verify every token over the whole context, so the output does not depend on it. The adapters are trained on
# sequences of a few hundred tokens (the shipped one: 320), so the far context buys their drafts little, while on
# these CPUs every key costs every row an exp that MLX's x86 back-end runs one float at a time (BENCHMARKS 7): with
# a window, a forward's mask block costs the same over 8k cached tokens as over 1k.
DRAFT_WINDOW = 1024


@dataclass(frozen=True)
class BlockMask:
    """The SBD inference mask of one decode step, as two scalars (see masks.inference_mask). One forward builds one
    and every layer gets it, so the boolean mask SDPA needs is built once per forward, by the first layer to ask.
    `window` (verified decoding): the mask rows see only the last `window` cached keys and this forward's rows."""

    causal_point: int
    window: Optional[int] = None
    _dense: dict = field(default_factory=dict, compare=False, repr=False)  # (q_len, offset) -> [q_len, S] bool

    def dense(self, q_len: int, offset: int) -> mx.array:
        if (q_len, offset) not in self._dense:
            self._dense[q_len, offset] = inference_mask(q_len, offset, self.causal_point)
        return self._dense[q_len, offset]


@dataclass(frozen=True)
class SpanMask:
    """A verified forward's mask in per-row form (masks.span_mask): row t sees keys j < visible[t] and keys in
    [lo[t], hi[t]). `dense` is the same mask as a boolean array [T, S], built once per forward, for SDPA. Rows from
    `mask_from` on are mask rows; with `window`, they see only the last `window` cached keys and this forward's rows."""

    visible: mx.array
    lo: mx.array
    hi: mx.array
    dense: mx.array
    mask_from: int = 0
    window: Optional[int] = None
    _split: dict = field(default_factory=dict, compare=False, repr=False)  # window_split's masks, once per forward


def make_span_mask(visible: mx.array, lo: mx.array, hi: mx.array, n_keys: int, mask_from: int = 0,
                   window: Optional[int] = None) -> SpanMask:
    return SpanMask(visible, lo, hi, span_mask(visible, lo, hi, n_keys), mask_from, window)


@dataclass(frozen=True)
class RowGroups:
    """The noised half's mask in gated training (loss.gated_sbd_loss), with the keys each group of its rows can see.

    A noised row sees the clean keys before its block and its own block's noised keys: row r (position s + r) sees
    nothing past clean key s + r nor outside noised keys r +- (k - 1). Dense attention over all L + n keys computes
    an exp for every pair, three quarters of them masked on average; here each group of ROWS_PER_GROUP rows attends
    only to the keys its rows can see (`keys`: indices into clean + noised keys; `masks`: the dense mask's rows and
    columns for them), the same result. Built once per forward (groups), shared by every layer."""

    keys: tuple  # per group: [K_g] int32 indices of the keys it may see
    masks: tuple  # per group: [B, 1, rows_g, K_g] bool
    rows: tuple  # per group: (first row, end row)


ROWS_PER_GROUP = 64  # few ops per layer (L / 64 groups), most of the masked pairs skipped


def row_groups(mask: mx.array, L: int, s: int, block_size_max: int) -> Union[mx.array, RowGroups]:
    """`mask` [B, 1, n, L + n]: the noised half's rows of the training mask (positions s..L-1, masks.training_mask,
    blocks of at most `block_size_max`) -> RowGroups, or the mask itself for a half too short to group. The noised
    keys a group takes reach block_size_max - 1 past its rows: one shape for every k (no retrace of a compiled step)."""
    n = mask.shape[2]
    if n <= ROWS_PER_GROUP:
        return mask
    margin = block_size_max - 1
    keys, masks, rows = [], [], []
    for r0 in range(0, n, ROWS_PER_GROUP):
        r1 = min(r0 + ROWS_PER_GROUP, n)
        lo, hi = max(r0 - margin, 0), min(r1 + margin, n)
        idx = mx.concatenate([mx.arange(min(s + r1, L)), L + mx.arange(lo, hi)]).astype(mx.int32)
        keys.append(idx)
        masks.append(mx.take(mask[:, :, r0:r1], idx, axis=3))
        rows.append((r0, r1))
    return RowGroups(tuple(keys), tuple(masks), tuple(rows))


def grouped_attention(q, k, v, scale: float, mask: RowGroups) -> mx.array:
    """Each group's rows over its keys (RowGroups), through sdpa; rows concatenated back in order."""
    out = [sdpa(q[:, :, r0:r1], mx.take(k, idx, axis=2), mx.take(v, idx, axis=2), scale, m)
           for (r0, r1), idx, m in zip(mask.rows, mask.keys, mask.masks)]
    return mx.concatenate(out, axis=2)


Mask = Union[None, str, mx.array, BlockMask, SpanMask, RowGroups]


def attention(q: mx.array, k: mx.array, v: mx.array, scale: float, mask: Mask) -> mx.array:
    """q: [B, Hq, T, D]; k, v: [B, Hkv, S, D] (cache + new keys). Returns [B, Hq, T, D]."""
    if isinstance(mask, (BlockMask, SpanMask)) and mask.window is not None:
        first = k.shape[2] - q.shape[2] - mask.window  # the window's first key
        c = mask.causal_point if isinstance(mask, BlockMask) else mask.mask_from
        if first > 0 and c < q.shape[2]:
            return windowed_attention(q, k, v, scale, mask, c, first)
    if isinstance(mask, BlockMask):
        return block_attention(q, k, v, scale, k.shape[2] - q.shape[2], mask)
    if isinstance(mask, SpanMask):
        return span_attention(q, k, v, scale, mask)
    if isinstance(mask, RowGroups):
        return grouped_attention(q, k, v, scale, mask)
    return sdpa(q, k, v, scale, mask)


# Query rows up to which a CPU forward folds grouped-query heads (decode forwards: a few rows over a long cache).
FOLD_MAX_ROWS = 64


def sdpa(q, k, v, scale: float, mask) -> mx.array:
    """mx.fast.scaled_dot_product_attention, except for a decode forward (<= FOLD_MAX_ROWS query rows) of a
    grouped-query model on the CPU: there MLX's SDPA always takes its unfused fallback, whose matmuls broadcast K/V
    over each group's query heads (a batch of n_heads [T, D] x [D, S] products per layer); folded_attention does
    one [group * T, D] x [D, S] product per KV head. Same math; a forward of 9-17 rows over a 2k-6k cache measured
    several times faster (BENCHMARKS 7)."""
    one_mask = mask is None or isinstance(mask, str) or (mask.ndim <= 2 and mask.dtype == mx.bool_)  # one for all heads
    if q.shape[1] != k.shape[1] and q.shape[2] <= FOLD_MAX_ROWS and one_mask and mx.default_device() == mx.cpu:
        if isinstance(mask, str):  # "causal": row i (position S - T + i) sees keys j <= S - T + i
            mask = None if q.shape[2] == 1 else inference_mask(q.shape[2], k.shape[2] - q.shape[2], q.shape[2])
        return folded_attention(q, k, v, scale, mask)
    return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)


def folded_attention(q, k, v, scale: float, mask) -> mx.array:
    """Grouped-query attention with each KV head's query heads stacked as rows. q: [B, Hq, T, D]; k, v: [B, Hkv, S,
    D]; mask: None or boolean, broadcastable to [T, S] (one mask for every head, as the decode masks are). The
    fallback's arithmetic: q scaled first, masked scores at the dtype's lowest value, softmax in float32."""
    B, n_heads, T, D = q.shape
    n_kv, S = k.shape[1], k.shape[2]
    groups = n_heads // n_kv
    q = (q * mx.array(scale, q.dtype)).reshape(B, n_kv, groups * T, D)  # head h = kv head h // groups: contiguous
    scores = q @ k.swapaxes(-1, -2)  # [B, n_kv, groups * T, S]
    if mask is not None:
        scores = scores.reshape(B, n_kv, groups, T, S)
        scores = mx.where(mask, scores, mx.array(mx.finfo(scores.dtype).min, scores.dtype))
        scores = scores.reshape(B, n_kv, groups * T, S)
    weights = mx.softmax(scores, axis=-1, precise=True)
    return (weights @ v).reshape(B, n_heads, T, D)


def windowed_attention(q, k, v, scale: float, mask: Union[BlockMask, SpanMask], c: int, first: int) -> mx.array:
    """A verified forward with its mask rows (rows c..T-1) windowed: the causal rows over the keys they see (every
    cached key and the rows up to theirs), the mask rows over keys first..S-1 only; two attentions, each through
    attention() (the Metal kernel or SDPA), their rows concatenated."""
    S, T = k.shape[2], q.shape[2]
    end = S - T + c  # keys past the causal rows' are mask rows', which no causal row sees
    causal_mask, window_mask = window_split(mask, c, first, end, S)
    causal = attention(q[:, :, :c], k[:, :, :end], v[:, :, :end], scale, causal_mask)
    masked = attention(q[:, :, c:], k[:, :, first:], v[:, :, first:], scale, window_mask)
    return mx.concatenate([causal, masked], axis=2)


def window_split(mask: Union[BlockMask, SpanMask], c: int, first: int, end: int, n_keys: int):
    """(the causal rows' mask over keys :end, the mask rows' over keys first:n_keys). Pre-drafting's are built by the
    first layer to ask and kept in `mask` for the others, as BlockMask.dense is."""
    if isinstance(mask, BlockMask):  # causal rows: causal; mask rows: every key of the window
        return "causal", None
    key = (c, first, end, n_keys)
    if key not in mask._split:
        mask._split[key] = (make_span_mask(mask.visible[:c], mask.lo[:c], mask.hi[:c], end),
                            make_span_mask(mask.visible[c:] - first, mask.lo[c:] - first, mask.hi[c:] - first,
                                           n_keys - first))
    return mask._split[key]


def block_attention(q, k, v, scale: float, offset: int, mask: BlockMask) -> mx.array:
    """Decode-step attention: new query i (position offset + i) sees key j iff j <= offset + i or i >= causal_point."""
    out = metal_block_attention(q, k, v, scale, offset, mask.causal_point)
    if out is not None:
        return out
    return sdpa(q, k, v, scale, mask.dense(q.shape[2], offset))


def span_attention(q, k, v, scale: float, mask: SpanMask) -> mx.array:
    """Verified-forward attention: row t sees keys j < visible[t] and lo[t] <= j < hi[t] (masks.span_mask)."""
    out = metal_span_attention(q, k, v, scale, mask.visible, mask.lo, mask.hi)
    if out is not None:
        return out
    return sdpa(q, k, v, scale, mask.dense)
