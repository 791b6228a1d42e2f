"""Data-parallel shares of a training batch (the same code under `mlx.launch`, any number of processes).

Every rank draws the same global batch and its noise, builds it, and trains rows [rank*b, (rank+1)*b) of it,
b = batch_size / world size; so a sequence's η, masks and k never depend on the rank. Each rank's loss is its share
of the global per-token means (its NTP/MATP sums over the label counts of the whole batch), so the shares'
gradients, summed with all_sum, are exactly the single-process gradient.
"""

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from .errors import SBDError
from .masks import training_mask

def shard_rows(batch_size: int, rank: int, size: int) -> slice:
    """The rows of each global batch that `rank` of `size` processes trains."""
    if batch_size % size:
        raise SBDError(f"--batch-size {batch_size} does not split evenly over {size} processes; "
                       f"use a multiple of {size} (it is the global batch, shared out across processes)")
    b = batch_size // size
    return slice(rank * b, (rank + 1) * b)

def shard(batch, seqs, k: int, rows: slice):
    """Rows `rows` of a global batch built by make_batch (same L, same noise as the whole batch). The mask
    [b, 1, 2L, 2L] is rebuilt for these rows rather than sliced, so the global one is never computed."""
    if rows == slice(0, len(seqs)):
        return batch
    part = {key: value[rows] for key, value in batch.items() if key != "mask"}
    lengths = mx.array([len(s) for s, _ in seqs[rows]], mx.int32)
    L = batch["ntp_targets"].shape[1]
    part["mask"] = training_mask(L, k, lengths, part["block_shifts"], noised_from=L - batch["matp_targets"].shape[1])
    return part


def label_totals(batch) -> mx.array:
    """[3]: NTP labels, masked tokens and draft positions (batches.make_batch) in the whole global batch (at least 1
    each): the loss denominators, and the draft accuracy's."""
    return mx.maximum(mx.stack([batch["ntp_weights"].sum(), batch["matp_weights"].sum(),
                                batch["draft_weights"].sum()]), 1)

def shard_loss(model, batch, totals, loss_fn):
    """This rank's share of the global-batch loss -> (loss, ntp share, matp share, hits). loss_fn's per-token means
    times this shard's label counts are its loss sums; over the global counts they add up across ranks to
    exactly the global means the single-process run computes (not an average of per-rank means). hits (a count,
    loss.loss_for) is this shard's own; summed over the ranks it is the global batch's."""
    _, ntp, matp, n_ntp, hits = loss_fn(model, batch)
    ntp_share = ntp * n_ntp / totals[0]
    matp_share = matp * batch["matp_weights"].sum() / totals[1]
    return ntp_share + matp_share, ntp_share, matp_share, mx.stop_gradient(hits)


def broadcast(tree: dict, world) -> dict:
    """Rank 0's values of an array tree on every rank: all_sums to which the other ranks add zeros. Leaves go
    in sorted key order: a restored optimizer state lists its keys in another order than a fresh one."""
    keep = world.rank() == 0
    flat = sorted(tree_flatten(tree), key=lambda kv: kv[0])
    flat = [(key, mx.distributed.all_sum(x if keep else mx.zeros_like(x), group=world)) for key, x in flat]
    mx.eval([x for _, x in flat])
    return tree_unflatten(flat)

def global_sum(values: np.ndarray, world) -> np.ndarray:
    """Sum of a small float vector over the ranks (the identity for a single process)."""
    if world.size() == 1:
        return values
    # float64 on the way back: np.float32 scalars are not JSON numbers (the training log writes them)
    return np.array(mx.distributed.all_sum(mx.array(values, mx.float32), group=world), dtype=np.float64)
