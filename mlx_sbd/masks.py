"""Every attention mask SBD needs, built in one place (True = may attend).

Training (SBD_METHOD.md §2): the model input is `concat(clean_L, noised_L)`; clean queries are causal over
the clean half; a noised query in block b sees the clean tokens strictly before its block and its own noised
block (bidirectionally). Inference (§3): new query i (absolute position offset + i) sees key j iff
`j <= offset + i` or `i >= causal_point` (the block being decoded sees everything, including itself).
"""

from functools import lru_cache
from typing import Optional

import mlx.core as mx


def training_mask(L: int, k: int, lengths: Optional[mx.array] = None, offsets: Optional[mx.array] = None,
                  noised_from: int = 0) -> mx.array:
    """Mask for the doubled sequence: [2L, 2L], or [B, 1, 2L, 2L] when `lengths` ([B]) marks padding.

    Blocks cover positions [b*k - o, (b+1)*k - o) for a grid shift o per sequence (`offsets` [B], default 0): verified
    decoding starts a block right after the last accepted token, anywhere, so gated training shifts the grid at
    random. Padding (position >= length) is never attended to. A padding query attends only to itself, so no row
    is all-False (such rows are undefined in MLX, SBD_METHOD.md trap 9); its outputs are dropped by the loss.
    `noised_from` = s: the noised half holds positions s..L-1 only (batches.make_batch drops blocks of prompt that no
    masked row can see), so the mask is [L + L - s] square: the doubled mask's rows and columns without those.
    """
    pos = mx.concatenate([mx.arange(L), mx.arange(noised_from, L)])  # both halves share positions
    idx = mx.arange(pos.size)
    q, kv = idx[:, None], idx[None, :]
    q_clean, kv_clean = q < L, kv < L
    q_pos, kv_pos = pos[:, None], pos[None, :]
    shift = 0 if offsets is None else offsets.reshape(-1, 1, 1)  # [B, 1, 1]
    q_blk, kv_blk = (q_pos + shift) // k, (kv_pos + shift) // k  # block ids on the (shifted) grid
    clean_rows = q_clean & kv_clean & (kv_pos <= q_pos)
    noised_rows = ~q_clean & ((kv_clean & (kv_blk < q_blk)) | (~kv_clean & (kv_blk == q_blk)))
    mask = clean_rows | noised_rows  # [2L, 2L], or [B, 2L, 2L] with offsets
    if lengths is None:
        return mask if offsets is None else mask[:, None]
    n = lengths.reshape(-1, 1, 1)
    q_valid, kv_valid = q_pos < n, kv_pos < n  # [B, 2L, 1], [B, 1, 2L]
    mask = (mask & q_valid & kv_valid) | ((q == kv) & ~q_valid)
    return mask[:, None]


def inference_mask(q_len: int, offset: int, causal_point: int) -> mx.array:
    """Mask [q_len, offset + q_len] for a decode step: queries `i >= causal_point` see everything. Every query sees
    all `offset` cached keys, so the mask is its last q_len columns (which depend on q_len and causal_point only,
    built once) padded on the left with True: one op per decode step, not eight."""
    tail = _new_keys_mask(q_len, causal_point)
    return mx.pad(tail, [(0, 0), (offset, 0)], constant_values=True) if offset else tail


@lru_cache(maxsize=64)
def _new_keys_mask(q_len: int, causal_point: int) -> mx.array:
    i, j = mx.arange(q_len)[:, None], mx.arange(q_len)[None, :]
    return (j <= i) | (i >= causal_point)  # evaluated with the first step that uses it, then a constant


def span_mask(visible: mx.array, lo: mx.array, hi: mx.array, n_keys: int) -> mx.array:
    """Mask [T, n_keys] of a verified forward in per-row form: query row t sees keys j < visible[t] (its causal
    prefix) and keys lo[t] <= j < hi[t] (its own mask block; lo = hi for causal rows). Every verified layout is
    of this form: the linear one (masks after the drafts) and pre-drafting's blocks at shared positions."""
    j = mx.arange(n_keys)[None, :]
    return (j < visible[:, None]) | ((j >= lo[:, None]) & (j < hi[:, None]))


def predraft_spans(offset: int, pending: int, m: int, k: int):
    """Pre-drafting's layout (TiDAR; VERIFIED_SBD.md 2): rows = `pending` tokens (x last) + m drafts d1..dm +
    m + 1 blocks of k masks, block i placed after d_i (block 0 right after x), as if exactly i drafts pass.

    Returns (positions [T], visible [T], lo [T], hi [T]) as int32 arrays, for keys = the `offset` cached tokens
    followed by the T rows: a causal row sees the cache and the rows up to itself; block i sees the cache, the
    pending tokens and d1..di, and its own k keys (bidirectionally). Block i's j-th mask sits at the position of
    the (i + j + 1)-th token after x, so blocks share positions."""
    c = pending + m  # causal rows
    T = c + (m + 1) * k
    t = mx.arange(T)
    block = mx.maximum(t - c, 0) // max(k, 1)  # the block a mask row is in (0 for causal rows, unused there)
    inside = mx.maximum(t - c, 0) % max(k, 1)
    is_mask = t >= c
    positions = offset + mx.where(is_mask, pending + block + inside, t)
    visible = offset + mx.where(is_mask, pending + block, t + 1)
    lo = mx.where(is_mask, offset + c + block * k, 0)
    hi = mx.where(is_mask, offset + c + (block + 1) * k, 0)
    return tuple(a.astype(mx.int32) for a in (positions, visible, lo, hi))


def branch_spans(offset: int, pending: int, m: int, at, k: int):
    """The linear layout with branch rows: rows = `pending` tokens (x last) + m drafts d1..dm + one branch row per
    entry of `at` + one block of k masks. A branch row holds another candidate for the position of the draft
    d_(i+1), i = its entry of `at` (the mask block's next-best guesses there; several rows may share a position):
    it sees the cache, the pending tokens and d1..di, and itself, as d_(i+1) would, so its causal output is the
    token after that candidate. No other row sees a branch row: the drafts are causal rows before it, and the mask
    block sees the cache, the pending tokens and d1..dm (and its own k keys).

    Returns (positions [T], visible [T], lo [T], hi [T]) as int32 arrays over keys = the `offset` cached tokens
    followed by the T rows (span_mask's form)."""
    at = list(at)
    c = pending + m  # causal rows
    b = c + len(at)  # first mask row
    T = b + k
    t = mx.arange(T)
    is_alt, is_mask = (t >= c) & (t < b), t >= b
    beside = mx.array(at + [0], mx.int32)[mx.clip(t - c, 0, len(at))]  # the draft index a branch row stands beside
    positions = offset + mx.where(is_alt, pending + beside, mx.where(is_mask, t - len(at), t))
    visible = offset + mx.where(is_alt, pending + beside, mx.where(is_mask, c, t + 1))
    lo = mx.where(is_alt, offset + t, mx.where(is_mask, offset + b, 0))
    hi = mx.where(is_alt, offset + t + 1, mx.where(is_mask, offset + T, 0))
    return tuple(a.astype(mx.int32) for a in (positions, visible, lo, hi))
