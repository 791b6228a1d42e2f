"""--cache-clean: each training batch's clean half, kept in memory after its first epoch.

A gated adapter leaves the causal path the base model, so the clean half of a training step (loss.clean_pass: the
keys and values of every layer, the soft targets folded into the head, the logged NTP terms, the base's argmax)
depends only on the batch's tokens, never on the adapter. The batches of a run are fixed groups of rows
(batches.batch_order; an epoch only reorders them, batches.batch_numbers), so from the second epoch on a step can skip that forward: the same loss and gradients
(the kept arrays are the ones the pass computes, in its dtype), for the memory they take. Worth it when the data is
seen several times (a small folder, a long stage); with one pass over the data it saves nothing.
"""

import os
from typing import Dict, List, Sequence

import mlx.core as mx

from .batches import PAD_TO
from .errors import SBDError
from .loss import clean_pass

MEMORY_SHARE = 0.5  # of the machine's memory: a cache estimated larger refuses to start


def bytes_per_token(model, soft: bool) -> int:
    """What the kept clean half holds per token: keys and values of every layer, the NTP term (float32) and argmax
    (int32), and with soft targets their vector and bias term (float32; loss.clean_pass)."""
    args = model.args
    heads = getattr(args, "num_key_value_heads", None) or args.num_attention_heads
    head_dim = getattr(args, "head_dim", None) or args.hidden_size // args.num_attention_heads
    item = model.lm.model.embed_tokens.weight.dtype.size if hasattr(model.lm.model.embed_tokens, "weight") else 4
    item = 4 if item == 1 else item  # a quantized embedding computes in float32 here
    return len(model.layers) * 2 * heads * head_dim * item + 8 + (4 * args.hidden_size + 4 if soft else 0)


def estimate(model, dataset: Sequence, batches: List[List[int]], rows: int, soft: bool) -> int:
    """Bytes the cache reaches once every batch was seen: `rows` of each batch (this process's share), padded as
    make_batch pads them."""
    per_token = bytes_per_token(model, soft)
    total = 0
    for idx in batches:
        longest = max(len(dataset[i][0]) for i in idx)
        total += rows * PAD_TO * -(-longest // PAD_TO) * per_token
    return total


def machine_memory() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


class CleanCache:
    """Batch number (in batches.batch_order) -> its clean half (loss.clean_pass's arrays), evaluated."""

    def __init__(self, model, dataset: Sequence, batches: List[List[int]], rows: int, soft: bool):
        self.soft = soft
        self.size = estimate(model, dataset, batches, rows, soft)
        memory = machine_memory()
        if memory and self.size > MEMORY_SHARE * memory:
            raise SBDError(f"--cache-clean would keep ~{self.size / 2**30:.1f} GB of clean-half keys and values, more "
                           f"than {MEMORY_SHARE:.0%} of this machine's {memory / 2**30:.0f} GB: train without it, or "
                           "with a smaller --max-seq-length or dataset")
        self.entries: Dict[int, dict] = {}

    def fill(self, number: int, model, batch: dict) -> dict:
        """`batch` with its clean half: kept from an earlier epoch, or computed now and kept."""
        if number not in self.entries:
            clean = clean_pass(model, batch, soft=self.soft)
            mx.eval(clean)
            self.entries[number] = clean
        return {**batch, **self.entries[number]}
