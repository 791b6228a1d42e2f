"""The SBD decode loop over an exact KV cache (SBD_METHOD.md §3), and the plain next-token path.

The cache only ever holds causal K/V of finalised tokens. A block starts as k masks. Its first forward
carries the previous block's k tokens (causal: their K/V are committed to the cache by this very forward)
plus the k masks; later forwards carry the block only. After every forward the block's own K/V are trimmed
off again (mlx_lm's KVCache.trim is O(1)), so nothing of a mask or a partly revealed block stays.

Blocks sit where training puts them, at 0, k, 2k, ... of the sequence (masks.training_mask). The prompt's
tail after its last multiple of k therefore opens the first block as already revealed tokens and stays out of
the cache until that block is done (`split_prompt`): in training a block's tokens are seen by the rest of the
block only through the block itself, never as clean (causal) keys.
"""

from dataclasses import dataclass, field
from typing import Callable, Iterator, List, Optional, Sequence, Tuple

import mlx.core as mx
from mlx_lm.generate import generate_step

from .attention import BlockMask
from .model import MASK_ID, SBDModel


@dataclass
class SBDCache:
    """Per-layer mlx_lm KV caches plus the finalised tokens whose K/V are not in them yet.

    A finished block's K/V ride along in the next block's first forward, so at the end of a generation the
    last tokens are `pending`; the next call that reuses this cache (multi-turn chat) prefills them first.
    """

    layers: list
    pending: List[int] = field(default_factory=list)

    @property
    def offset(self) -> int:
        return self.layers[0].offset


def make_prompt_cache(model: SBDModel) -> SBDCache:
    return SBDCache(model.make_cache())


def prefill(model: SBDModel, cache: SBDCache, tokens: Sequence[int], step: int = 512) -> Optional[mx.array]:
    """Run the cache's pending tokens, then `tokens`, causally into the cache, `step` tokens per forward.

    Returns the causal path's log-probabilities [V] for the token after the last one (None if nothing ran)."""
    tokens, cache.pending = list(cache.pending) + list(tokens), []
    h = None
    for i in range(0, len(tokens), step):
        h = model.lm.model(mx.array(tokens[i : i + step])[None], cache=cache.layers)  # mlx_lm's own forward: hidden
        mx.eval([c.state for c in cache.layers])
    return None if h is None else log_softmax(model.logits(h[0, -1:]))[0]


def prefill_prompt(model: SBDModel, cache: SBDCache, ids: Sequence[int], block_size: int,
                   step: int = 512) -> Tuple[List[int], mx.array]:
    """Prefill a prompt for SBD decoding -> (head, causal log-probabilities [V] of the first answer token).

    The head (split_prompt) opens the first decode block and must not stay in the cache, but the causal path's
    prediction of the first answer token needs it: the whole prompt runs causally and the head's K/V are trimmed
    off again (O(1)), the same forward that prefilling alone would cost plus the head's few tokens."""
    to_prefill, head = split_prompt(cache, ids, block_size)
    first = prefill(model, cache, to_prefill + head, step)
    for c in cache.layers:
        c.trim(len(head))
    return head, first


def log_softmax(logits: mx.array) -> mx.array:
    """Float32 log-probabilities over the last axis (decoding, and the scripts that score what it would do)."""
    logits = logits.astype(mx.float32)
    return logits - mx.logsumexp(logits, axis=-1, keepdims=True)


def split_prompt(cache: SBDCache, ids: Sequence[int], block_size: int) -> Tuple[List[int], List[int]]:
    """(tokens to prefill, head): `head` is the tail of the prompt inside the first decode block, which ends at
    the next multiple of block_size of the whole sequence (cache, pending tokens and prompt)."""
    ids = list(ids)
    h = min((cache.offset + len(cache.pending) + len(ids)) % block_size, len(ids))
    return ids[: len(ids) - h], ids[len(ids) - h :]


def block_forward(model: SBDModel, tokens: List[int], k: int, cache: SBDCache, causal: bool = False) -> mx.array:
    """One SBD forward over `tokens` = [committed-to-be prefix (causal)] + [block of k (sees everything)].

    Returns the block's log-probabilities [k, vocab], led with `causal` by the prefix's last position (the causal
    path's prediction of the block's first token): [k + 1, vocab]. Leaves only the prefix's K/V in the cache.
    """
    x = mx.array(tokens)[None]
    h = model.forward(x, mask=BlockMask(causal_point=len(tokens) - k), cache=cache.layers, return_hidden=True)
    for c in cache.layers:
        c.trim(k)
    return log_softmax(model.logits(h[0, -k - causal :]))


Step = Tuple[List[int], int, Optional[str]]  # (newly finalised tokens, forwards so far, finish reason or None)


def sbd_steps(
    model: SBDModel,
    cache: SBDCache,
    *,
    block_size: int,
    select: Callable[[mx.array, mx.array], mx.array],
    sample: Callable[[mx.array], mx.array],
    max_tokens: int,
    max_length: int,
    eos_ids: Sequence[int],
    head: Sequence[int] = (),
    first: Optional[mx.array] = None,
) -> Iterator[Step]:
    """SBD generation after the prompt is prefilled but its `head` (split_prompt), which opens the first block:
    yields each run of newly finalised tokens (the block's revealed prefix) as it grows.

    With `first`, the causal log-probabilities of the first answer token (prefill_prompt), every block's first
    open position takes the causal path's prediction instead of its masked one (`ntp_first`): the two see the
    same tokens and are trained on the same label, so they agree once training has converged, but an SBD
    fine-tune gets the causal one right first, and the first token steers the whole answer. Later blocks get it
    from their first forward, which carries the previous block causally anyway (one more row of logits). When
    the causal token differs from the masked guess there, that forward reveals it alone.
    """
    eos = set(eos_ids)
    ntp_first, causal = first is not None, first
    prev: List[int] = []  # the last finished block: finalised, K/V not yet in the cache
    head = list(head)  # finalised tokens at the start of the current block, not in the cache
    produced = nfe = 0
    while True:
        start_pos = cache.offset + len(prev)  # absolute position of the block's first token
        # Blocks end at multiples of block_size, as in training (masks.training_mask aligns blocks at 0, k, 2k of
        # the sequence). Masks at in-block offsets the model never trained on cost the tiny arithmetic model
        # 92% -> 63% exact match at k=8, gamma=0.1 (BENCHMARKS.md).
        k = min(block_size - start_pos % block_size, len(head) + max_tokens - produced, max_length - start_pos)
        if k <= len(head):
            cache.pending = prev + head
            yield [], nfe, "length"
            return
        blk, done = head + [MASK_ID] * (k - len(head)), len(head)  # done: length of the block's finalised prefix
        c = done  # the block's first open position
        while done < k:
            with_causal = ntp_first and bool(prev)  # a block's first forward: the previous block runs causally
            logprobs = block_forward(model, prev + blk, k, cache, causal=with_causal)
            if with_causal:
                causal, logprobs = logprobs[0], logprobs[1:]
            prev = []  # committed by that forward
            masked = mx.array([t == MASK_ID for t in blk])
            if ntp_first and blk[c] == MASK_ID:
                guess = logprobs[c].argmax()
                logprobs[c] = causal  # the same tokens seen, the same label trained: the causal path knows it best
                values = sample(logprobs)
                # The masked guesses at the other positions assume the masked guess at c: when the causal token
                # differs, they describe another answer, so only c is revealed this forward.
                reveal = mx.where(guess == values[c], select(logprobs, masked), mx.arange(k) == c)
            else:
                reveal, values = select(logprobs, masked), sample(logprobs)
            reveal, values = reveal.tolist(), values.tolist()  # the one host sync per forward
            nfe += 1
            for i in range(k):
                if reveal[i] and blk[i] == MASK_ID:
                    blk[i] = values[i]
            start = done
            while done < k and blk[done] != MASK_ID:
                done += 1
                if blk[done - 1] in eos:
                    cache.pending = blk[:done]
                    yield blk[start : done - 1], nfe, "stop"
                    return
            if done > start:
                yield blk[start:done], nfe, None
        prev, produced, head = blk, produced + k - len(head), []


def ntp_steps(
    model: SBDModel,
    last_token: int,
    cache: SBDCache,
    *,
    sampler: Callable[[mx.array], mx.array],
    max_tokens: int,
    max_length: int,
    eos_ids: Sequence[int],
) -> Iterator[Step]:
    """block_size=1: plain next-token decoding with mlx_lm's own generate_step, after the prompt but its last
    token is prefilled."""
    budget = min(max_tokens, max_length - cache.offset - 1)
    nfe = 0
    for token, _ in generate_step(
        mx.array([last_token]), model, max_tokens=budget, sampler=sampler, prompt_cache=cache.layers
    ):
        nfe += 1  # generate_step has already fed `token` into the cache (it pipelines one step ahead)
        if token in eos_ids:
            yield [], nfe, "stop"
            return
        yield [token], nfe, None
    yield [], nfe, "length"
