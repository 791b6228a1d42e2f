"""Doubled SBD training batches (SBD_METHOD.md §2) and the length-sorted batch order.

A batch of sequences becomes one model input [B, 2L] = concat(clean, noised) with repeated positions
[0..L-1, 0..L-1] and the training mask of masks.training_mask. The noised copy replaces each eligible token
by MASK_ID independently with probability η ~ U(0, 1) drawn once per sequence.

Labels:
- NTP on the clean half: position j predicts token j+1 (shifted), where token j+1 exists and is not a prompt
  token. Exactly mlx_lm's default_loss mask.
- MATP on the noised half: same-position labels (the clean token at j), at masked positions only.
Choices the paper leaves open (documented here, tested in tests/test_batches.py):
- The clean half is the whole sequence including its final EOS (which has no NTP label), so the noised half
  covers the EOS too: block decoding must learn to reveal EOS inside a block, and with the paper's
  `inputs = seq[:-1]` it would never be a MATP target.
- Prompt tokens (offset > 0 with --mask-prompt) are never masked: at inference the prompt is always clean.
- A partial trailing block (sequence end inside a block) keeps its MATP loss: at inference a block may also
  run past the end of the answer, and its masked positions are ordinary predictions.
- Padding (position >= length) is never attended to (training_mask) and carries no loss.
"""

from typing import Dict, Iterator, List, Sequence, Tuple

import mlx.core as mx
import numpy as np

from .errors import SBDError
from .masks import training_mask
from .model import MASK_ID

PAD_TO = 32  # pad L to a multiple of this: few distinct shapes, so the compiled step rarely retraces

Batch = Dict[str, mx.array]


def make_batch(seqs: Sequence[Tuple[List[int], int]], k: int, rng: np.random.Generator, eta=None,
               shift_blocks: bool = False, trim: bool = True) -> Batch:
    """seqs: [(tokens, prompt offset)]. `eta` ([B]) overrides η ~ U(0,1) (tests use 0 and 1). `shift_blocks` moves
    each sequence's block grid by a random o ~ U{0..k-1} (masks.training_mask): verified decoding starts a mask block
    right after the last accepted token, at any offset, and drafts at offsets never trained are poor
    (VERIFIED_SBD.md trap 4). Drawn after the noise, so runs without it keep their random streams.

    Returns tokens/positions [B, L + L - s] int32, mask [B, 1, L + L - s, L + L - s] bool, [B, L] targets/weights
    for NTP (clean half) and [B, L - s] for MATP (the noised half from position s, see below; s = 0 without a
    prompt).
    """
    B = len(seqs)
    lengths = np.array([len(s) for s, _ in seqs])
    offsets = np.array([o for _, o in seqs])
    L = int(PAD_TO * -(-lengths.max() // PAD_TO))
    clean = np.zeros((B, L), np.int32)  # padding id 0: never attended, never in the loss
    for i, (s, _) in enumerate(seqs):
        clean[i, : len(s)] = s
    pos = np.arange(L)[None]  # [1, L]
    eta = rng.uniform(0.0, 1.0, size=B) if eta is None else np.asarray(eta, np.float64)
    eligible = (pos >= offsets[:, None]) & (pos < lengths[:, None])  # [B, L]
    masked = eligible & (rng.uniform(0.0, 1.0, size=(B, L)) < eta[:, None])
    noised = np.where(masked, MASK_ID, clean).astype(np.int32)

    ntp_targets = np.zeros((B, L), np.int32)
    ntp_targets[:, :-1] = clean[:, 1:]
    ntp_weights = (pos + 1 < lengths[:, None]) & (pos + 1 >= offsets[:, None])
    shifts = rng.integers(0, k, size=B).astype(np.int32) if shift_blocks else np.zeros(B, np.int32)
    # The noised half starts at s, the first block (of any sequence) that holds an answer token: a noised row sees
    # only its own block's noised rows, so the noised copies of whole prompt blocks are never seen by a masked row
    # and cost a forward and backward for nothing. Rounded down to PAD_TO (few shapes); the losses are unchanged.
    first_block = np.maximum(((offsets + shifts) // k) * k - shifts, 0)
    s = int(first_block.min() // PAD_TO * PAD_TO) if trim else 0  # trim=False: the whole noised copy (tests)
    positions = np.concatenate([np.arange(L), np.arange(s, L)]).astype(np.int32)
    # Draft positions: masked tokens after another masked token of their block. The first masked token of a block
    # sees everything before it, as the causal row before it does; verified decoding takes that token from the
    # causal row and uses the block's later rows as drafts (decode.verify_step), so only these are drafts.
    block = (pos + shifts[:, None]) // k
    after_masked = np.zeros_like(masked)
    after_masked[:, 1:] = masked[:, :-1] & (block[:, 1:] == block[:, :-1])
    drafts = masked & after_masked

    return {
        "tokens": mx.array(np.concatenate([clean, noised[:, s:]], axis=1)),  # [B, L + L - s]
        "positions": mx.array(np.broadcast_to(positions, (B, positions.size))),
        "mask": training_mask(L, k, mx.array(lengths.astype(np.int32)), mx.array(shifts), noised_from=s),
        "block_shifts": mx.array(shifts),  # [B]: each sequence's grid shift o (0 unless shift_blocks)
        "ntp_targets": mx.array(ntp_targets),  # [B, L]
        "ntp_weights": mx.array(ntp_weights.astype(np.float32)),
        "matp_targets": mx.array(clean[:, s:]),  # [B, L - s]
        "matp_weights": mx.array(masked[:, s:].astype(np.float32)),
        "draft_weights": mx.array(drafts[:, s:].astype(np.float32)),  # [B, L - s]: masked and a draft position
    }


def batch_order(dataset: Sequence, batch_size: int) -> List[List[int]]:
    """Length-sorted batches of indices (similar lengths together waste less padding); remainder dropped."""
    if len(dataset) < batch_size:
        raise SBDError(f"the dataset has {len(dataset)} examples, fewer than --batch-size {batch_size}")
    idx = sorted(range(len(dataset)), key=lambda i: len(dataset[i][0]))
    return [idx[i : i + batch_size] for i in range(0, len(idx) - batch_size + 1, batch_size)]


def batch_numbers(n_batches: int, seed: int, start: int = 0) -> Iterator[int]:
    """Endless stream of batch numbers (indices into batch_order). Epoch e visits the batches in the permutation
    drawn from seed (seed, e), so batch n of the stream is a pure function of (seed, n): a resumed run passes `start`
    = the number of batches already consumed and sees the same data order as an uninterrupted one. A batch keeps its
    number from epoch to epoch (what a run that keeps each batch's clean half keys it by, clean_cache.py)."""
    n = start
    while True:
        epoch, i = divmod(n, n_batches)
        yield int(np.random.default_rng([seed, epoch]).permutation(n_batches)[i])
        n += 1
