"""Placeholder until the Metal kernel lands: no kernel, the reference path runs."""


def metal_block_attention(q, k, v, scale, offset, causal_point):
    return None
