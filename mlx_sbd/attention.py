"""Attention for the SBD forward: arbitrary boolean masks, and the block-masked decode step.

The decode step's mask depends on two scalars only (`offset`, `causal_point`, see masks.inference_mask). On a
Mac the custom Metal kernel computes it without materialising the mask; everywhere else (and for shapes the
kernel does not cover) mx.fast.scaled_dot_product_attention runs with the equivalent boolean mask.
"""

from dataclasses import dataclass
from typing import Union

import mlx.core as mx

from .masks import inference_mask
from .metal_kernel import metal_block_attention


@dataclass(frozen=True)
class BlockMask:
    """The SBD inference mask of one decode step, as two scalars (see masks.inference_mask)."""

    causal_point: int


Mask = Union[None, str, mx.array, BlockMask]


def attention(q: mx.array, k: mx.array, v: mx.array, scale: float, mask: Mask) -> mx.array:
    """q: [B, Hq, T, D]; k, v: [B, Hkv, S, D] (cache + new keys). Returns [B, Hq, T, D]."""
    if isinstance(mask, BlockMask):
        return block_attention(q, k, v, scale, k.shape[2] - q.shape[2], mask.causal_point)
    return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)


def block_attention(q, k, v, scale: float, offset: int, causal_point: int) -> mx.array:
    """Decode-step attention: new query i (position offset + i) sees key j iff j <= offset + i or i >= causal_point."""
    out = metal_block_attention(q, k, v, scale, offset, causal_point)
    if out is not None:
        return out
    mask = inference_mask(q.shape[2], offset, causal_point)
    return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)
