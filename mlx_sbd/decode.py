"""The SBD decode protocol over an exact KV cache: prefill, verified decoding (the default), the paper's lossy loop
(SBD_METHOD.md §3) and the plain next-token path. generate.py calls `decode_steps` and knows nothing else of it.

Verified decoding (VERIFIED_SBD.md §2). Every forward carries, causally, the tokens not yet in the cache (the last
committed token x, and after a prompt or an earlier turn any others) and the drafts d1..dm, then a block of k masks
that sees every row (masks.inference_mask, the lossy loop's first-forward mask):
    rows = [.. x d1 .. dm] + [M1 .. Mk]
The causal rows verify: the row at x predicts d1, the row at d_j predicts d_{j+1}; the agreeing prefix d1..da is
accepted and the row after it supplies one more token, which is always the causal path's own. The mask rows after
M1 supply the next drafts (M1 predicts the same position as that last causal row); they assumed d1..dm, so they
are used only when every draft was accepted. K/V of the rejected drafts and of the masks are trimmed off (mlx_lm's
trim_prompt_cache, O(1)). So greedy output is token for token the causal path's greedy output, and with a gated
adapter the causal path is the base model. Sampling uses the speculative-sampling rule (Leviathan et al.; Chen et
al.): draft d ~ q (the masked marginal), accepted with probability min(1, p(d)/q(d)), else the token is drawn from
norm(max(0, p - q)); p and q are filtered by the same temperature / top-p / top-k, so the output keeps the
distribution of plain sampling from p.

Branch rows (drafting.py, masks.branch_spans) are causal rows placed between the drafts and the mask block, each
holding another candidate for a draft's position: when the verifier's token there is that candidate, the branch row's
own token (drawn from its distribution when sampling, which is then its q) is the next forward's first draft. Like
the mask rows they are trimmed from the cache after the forward.

The lossy loop writes the mask block's reveals straight into the answer, on blocks aligned to multiples of k of
the sequence as in the paper's training; its docstring has the details.

SBDCache.tokens is the conversation the cache holds (prompt and generated tokens of every call): K/V of all but
its `pending` tail are in the cache; the next call runs the pending tokens first.
"""

import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, List, Optional, Sequence, Tuple, Union

import mlx.core as mx
from mlx_lm.generate import generate_step, generation_stream
from mlx_lm.models.cache import can_trim_prompt_cache, trim_prompt_cache
from mlx_lm.sample_utils import apply_top_k, apply_top_p

from . import attention
from .attention import BlockMask, make_span_mask
from .costs import cached_row_cost
from .corpus import Corpus
from .drafting import Drafter, PromptLookup, learned
from .errors import SBDError
from .masks import branch_spans, predraft_spans
from .model import MASK_ID, SBDModel
from .samplers import logits_entropy


@dataclass
class SBDCache:
    """Per-layer mlx_lm KV caches, the conversation they hold, and its tail whose K/V are not in them yet."""

    layers: list
    pending: List[int] = field(default_factory=list)
    tokens: List[int] = field(default_factory=list)

    @property
    def offset(self) -> int:
        return self.layers[0].offset

    def can_trim(self) -> bool:
        return can_trim_prompt_cache(self.layers)

    def trim_to(self, n: int) -> None:
        """Keep only the first n tokens of the conversation (a server reusing the prefix two requests share)."""
        n = max(0, min(n, len(self.tokens)))
        cached = len(self.tokens) - len(self.pending)
        if n < cached:
            if not self.can_trim():
                raise SBDError("this prompt cache cannot be trimmed (a rotating or quantized cache past its size)")
            trim_prompt_cache(self.layers, cached - n)
        self.tokens, self.pending = self.tokens[:n], self.tokens[min(n, cached) : n]


def make_prompt_cache(model: SBDModel) -> SBDCache:
    return SBDCache(model.make_cache())


@dataclass
class Step:
    """What one decoding forward (or a stop) finalised, and the counts so far."""

    tokens: List[int]
    nfe: int  # forward passes so far (prefill not counted)
    drafted: int = 0  # drafts verified so far
    accepted: int = 0  # of which accepted
    finish: Optional[str] = None  # "stop" (EOS), "length" or None
    rows: int = 0  # rows (query positions) of all forwards so far: with time(rows), what the forwards cost
    rescued: int = 0  # forwards so far whose rejected draft a branch row stood beside (its token is the next draft)


def log_softmax(logits: mx.array) -> mx.array:
    """Float32 log-probabilities over the last axis (decoding, and the scripts that score what it would do)."""
    logits = logits.astype(mx.float32)
    return logits - mx.logsumexp(logits, axis=-1, keepdims=True)


def prefill(model: SBDModel, cache: SBDCache, tokens: Sequence[int], step: int = 512, keep: int = 0) -> Optional[mx.array]:
    """Add `tokens` to the conversation and run its pending tokens but the last `keep` causally into the cache,
    `step` per forward. Returns the causal log-probabilities [V] after the last token run (None if none ran)."""
    cache.tokens += list(tokens)
    cache.pending += list(tokens)
    run, cache.pending = cache.pending[: len(cache.pending) - keep], cache.pending[len(cache.pending) - keep :]
    h = None
    for i in range(0, len(run), step):
        h = model.lm.model(mx.array(run[i : i + step])[None], cache=cache.layers)  # mlx_lm's own forward: hidden
        mx.eval([c.state for c in cache.layers])
    return None if h is None else log_softmax(model.logits(h[0, -1:]))[0]


def decode_steps(model: SBDModel, cache: SBDCache, ids: Sequence[int], *, block_size: int, verify: bool = True,
                 gamma: float, select: Callable, sample: Callable, temp: float = 0.0, top_p: float = 1.0,
                 top_k: int = 0, ntp_first: bool = True, max_tokens: int, max_length: int, eos_ids: Sequence[int],
                 prefill_step_size: int = 512, draft: Optional[str] = None,
                 lookup: Optional[PromptLookup] = None, layout: str = "auto",
                 branch: Union[int, str, None] = None, corpus: Union[Corpus, bool, None] = None) -> Iterator[Step]:
    """Prefill the prompt `ids` now (the caller times it), then return the decoding's steps: plain next-token
    decoding (draft "none"), else verified decoding with drafts from `draft` (drafting.resolve_draft: sbd, lookup,
    both, auto) or (verify=False) the paper's lossy loop. draft=None: "none" for block_size 1, else "sbd". `layout`:
    one mask block after the drafts (linear), one after each (predraft), or auto's choice; `branch`: branch rows per
    forward (drafting.py: the mask block's next-best guesses beside its drafts; a count, "auto", or None for the
    default, drafting.resolve_branch); `corpus`: the lookup drafts' corpus of earlier answers (corpus.py), None for
    the model's (its adapter folder's, if any), False for none. `sample` is the token sampler
    (samplers.make_token_sampler) of the plain and lossy paths; verified decoding needs the distribution itself, so
    it takes temp / top_p / top_k."""
    common = dict(max_tokens=max_tokens, max_length=max_length, eos_ids=set(eos_ids))
    if draft is None:
        draft = "none" if block_size == 1 else "sbd"
    if draft == "none":
        prefill(model, cache, ids, prefill_step_size, keep=1)
        return ntp_steps(model, cache, sampler=sample, **common)
    if verify:
        if not cache.can_trim():
            raise SBDError("verified decoding trims rejected drafts from the KV cache, but this prompt cache cannot be "
                           "trimmed (a rotating or quantized cache past its size); use a cache from make_prompt_cache")
        prefill(model, cache, ids, prefill_step_size, keep=1)
        auto = draft == "auto"
        drafter = Drafter(draft, lookup, has_adapter=model.sbd is not None, cost=cached_row_cost(model) if auto else None,
                          block_size=block_size, layout=layout,
                          sbd_prior=model.sbd.draft_acceptance if model.sbd is not None else None,
                          stop=eos_ids, gamma=gamma, branch=branch,
                          corpus=model.corpus if corpus is None else corpus or None,
                          # carried over only when greedy: a seed must give the same draws, so the same choices
                          acceptance=learned(model, block_size) if auto and temp == 0 else None)
        return verified_steps(model, cache, drafter, gamma=gamma, temp=temp, top_p=top_p, top_k=top_k, **common)
    if ntp_first:
        head, first = prefill_prompt(model, cache, ids, block_size, prefill_step_size)
        mx.eval(first)
    else:
        to_prefill, head = split_prompt(cache, ids, block_size)
        prefill(model, cache, to_prefill, prefill_step_size)
        cache.tokens += head
        first = None
    return sbd_steps(model, cache, block_size=block_size, select=select, sample=sample, head=head, first=first,
                     **common)


# --- verified decoding ---------------------------------------------------------------------------------------
def filtered_probs(logits: mx.array, temp: float, top_p: float, top_k: int) -> mx.array:
    """The distribution plain sampling draws from (mlx_lm's make_sampler: top-p then top-k on the log-probabilities,
    then temperature), as probabilities [..., V]. Verified sampling needs it explicitly for p and q alike."""
    logprobs = log_softmax(logits)
    if 0 < top_p < 1:
        logprobs = apply_top_p(logprobs, top_p)
    if 0 < top_k < logprobs.shape[-1]:
        logprobs = apply_top_k(logprobs, top_k)
    return mx.softmax(logprobs / temp, axis=-1)


def draft_length(logits: mx.array, gamma: float):
    """How many leading drafts to propose: the EB rule on a prefix, i.e. drafts while the entropies (nats) of the
    drafts before them sum to <= gamma; at least one. gamma = inf proposes them all without computing entropies
    (an exp over the vocabulary per row, which MLX's x86 CPU back-end runs scalar), as a Python int."""
    n = logits.shape[0]
    if gamma == float("inf") or n == 0:
        return n
    h = logits_entropy(logits)
    return ((mx.cumsum(h) - h) <= gamma).sum()


def verify_step(model: SBDModel, cache: SBDCache, inputs: mx.array, m: int, k: int, q: Optional[mx.array], *,
                gamma: float, temp: float, top_p: float, top_k: int, predraft: bool = False,
                alts: Sequence[int] = (), want_alts: int = 0):
    """One verified forward over `inputs` = [tokens not in the cache (x last)] + m drafts + branch rows + mask blocks
    of k: one after the drafts (the linear layout), or with `predraft` m + 1, block i after d_i
    (masks.predraft_spans), so the next drafts exist whatever the verifier accepts. Branch rows (linear layout only,
    masks.branch_spans) hold other candidates for the drafts' positions, one row per entry of `alts` (the draft
    index it stands beside): when the verifier rejects d_(i+1) and its token is a candidate there, that branch
    row's own causal token is the next forward's first draft.

    Returns (a, n, t, e, q_next, branch), lazy: a the accepted drafts, t the token after them, e [k-1] the next
    drafts of which n are proposed (from the block after d_a; n a Python int when gamma is inf); q_next [k-1, V]
    the probabilities the e were drawn from (None when greedy); branch None without branch rows or `want_alts`,
    else (y [len(alts)], q_y [len(alts), V] or None, others [k-1, want_alts] or None): y the branch rows' tokens
    (drawn from their distributions q_y when sampling) and others the block's `want_alts` best guesses other than e
    at each next position, best first. Greedy, a is None and t holds the m + 1 causal rows' argmaxes, then the
    branch rows': the caller counts the drafts that agree with them (`agreed`) and takes the token after, which
    costs the host nothing and the device five ops fewer (on small models every op of the step shows). q [m, V]:
    what the drafts were drawn from (None when greedy: one-hot). The cache grows by every row; the caller trims
    what was not accepted."""
    rows, nb = inputs.shape[0], len(alts)
    blocks = (m + 1 if predraft else 1) if k else 0
    c = rows - blocks * k  # first mask row
    d = c - nb  # the end of the causal rows (x, d1..dm); the branch rows sit between
    positions = None
    if blocks > 1:
        positions, visible, lo, hi = predraft_spans(cache.offset, d - m, m, k)
        mask = make_span_mask(visible, lo, hi, cache.offset + rows, mask_from=c, window=attention.DRAFT_WINDOW)
    elif nb:
        positions, visible, lo, hi = branch_spans(cache.offset, d - m, m, alts, k)
        mask = make_span_mask(visible, lo, hi, cache.offset + rows, mask_from=c, window=attention.DRAFT_WINDOW)
    else:  # mask rows draft from the last DRAFT_WINDOW cached tokens; the causal rows see them all
        mask = BlockMask(causal_point=c, window=attention.DRAFT_WINDOW) if k else "causal"
    h = model.forward(inputs, positions=positions, mask=mask, cache=cache.layers, return_hidden=True,
                      mask_rows=blocks * k)  # [rows, hidden]
    drafts = inputs[d - m : d]

    def after(a):  # logits of the next drafts' rows: M2..Mk of the block that assumed a accepted drafts
        return model.logits(mx.take(h[c:].reshape(blocks, k, -1), a, axis=0)[1:])

    def others(logits, e):  # the block's best guesses other than e per row, best first: candidates for branch rows
        if not want_alts:  # (successive argmaxes: an argpartition over the vocabulary cost ~3% of a SmolLM2 forward)
            return None
        vocab, picks = mx.arange(logits.shape[-1]), []
        for _ in range(want_alts):
            logits = mx.where(vocab == (picks[-1] if picks else e)[:, None], -mx.inf, logits)
            picks.append(logits.argmax(-1))
        return mx.stack(picks, axis=-1)

    if temp == 0 and blocks <= 1:  # greedy, linear: one lm-head call and one argmax for causal and mask rows
        logits = model.logits(mx.concatenate([h[d - m - 1 : c], h[c + 1 :]]))  # x, d1..dm, branch rows, M2..Mk
        targets = logits.argmax(-1)
        e = targets[m + 1 + nb :]
        branch = (targets[m + 1 : m + 1 + nb], None, others(logits[m + 1 + nb :], e)) if nb or want_alts else None
        return None, draft_length(logits[m + 1 + nb :], gamma), targets[: m + 1 + nb], e, None, branch
    causal = model.logits(h[d - m - 1 : d])
    masked = None if blocks > 1 else model.logits(h[c + 1 :])  # the rows after M1: what M1 predicts, x's row does
    if temp == 0:  # greedy, pre-drafting: the block after d_a, once a is known (on the device: no sync; the
        targets = causal.argmax(-1)  # host counts the same a again from the targets, as in the linear layout)
        a = mx.cumprod(targets[:m] == drafts).sum() if m else mx.array(0)
        masked = after(a)
        return None, draft_length(masked, gamma), targets, masked.argmax(-1), None, None
    p = filtered_probs(causal, temp, top_p, top_k)  # [m+1, V]
    if m:
        pd = mx.take_along_axis(p[:m], drafts[:, None], axis=-1)[:, 0]
        qd = mx.take_along_axis(q, drafts[:, None], axis=-1)[:, 0]
        a = mx.cumprod(mx.random.uniform(shape=(m,)) * qd < pd).sum()  # accept with probability min(1, p/q)
        residual = mx.concatenate([mx.maximum(p[:m] - q, 0.0), p[m:]])  # after all m: plain p
    else:
        a, residual = mx.array(0), p
    t = mx.random.categorical(mx.log(residual[a]))  # categorical normalises norm(max(0, p - q)) itself
    branch = None
    if nb:  # a branch row's token is a draft for the next forward: drawn from its own filtered distribution
        q_y = filtered_probs(model.logits(h[d:c]), temp, top_p, top_k)
        branch = (mx.random.categorical(mx.log(q_y)), q_y, None)
    if not k:  # no mask block in this forward: no next drafts
        return a, 0, t, mx.zeros((0,), mx.int32), None, branch
    masked = after(a) if blocks > 1 else masked
    q_next = filtered_probs(masked, temp, top_p, top_k)
    e = mx.random.categorical(mx.log(q_next))
    if want_alts:
        branch = (*(branch or (mx.zeros((0,), mx.int32), None))[:2], others(masked, e))
    return a, draft_length(masked, gamma), t, e, q_next, branch


def agreed(drafts: List[int], targets: List[int]) -> int:
    """How many leading drafts equal the causal rows' tokens (greedy verification, on the host)."""
    a = 0
    while a < len(drafts) and drafts[a] == targets[a]:
        a += 1
    return a


def verified_steps(model: SBDModel, cache: SBDCache, drafter: Drafter, *, gamma: float, temp: float, top_p: float,
                   top_k: int, max_tokens: int, max_length: int, eos_ids: set) -> Iterator[Step]:
    """Verified decoding after prefill (cache.pending holds at least the prompt's last token): one Step per forward.
    `drafter` (drafting.py) says what each forward carries: drafts from the mask block or prompt lookup, and
    whether (and how many) masks follow them.

    The next forward is launched (mx.async_eval) before a step is yielded, so the caller's work on it (detokenizing,
    streaming) overlaps the device's; a generator closed early trims that forward's rows back off the cache."""
    produced = nfe = drafted = accepted = rows = rescues = 0
    vocab = model.args.vocab_size

    def launch(masked: Optional[List[int]], q_masked: Optional[mx.array], candidates: Optional[List[List[int]]],
               branch: Optional[List[int]], q_branch: Optional[mx.array]):
        """Build and start the next forward -> (its lazy outputs, drafts, branch rows, mask rows, rows, source,
        predraft, (context, clock)), or None when nothing is left to do. `candidates`: the block's next-best guesses
        for the positions of `masked`; `branch`: the draft a branch row made (after a rejection it rescued)."""
        left, room = max_tokens - produced, max_length - cache.offset - len(cache.pending)
        if left <= 0 or room <= 0:
            return None
        # drafts past the budget or the context are never needed
        drafts, source, k, predraft = drafter.plan(cache.tokens, masked, min(left - 1, room - 1), len(cache.pending),
                                                   room, cache.offset, branch=branch)
        m = len(drafts)
        k = min(k, room - m)  # block i's masks reach position m_i + k at most: room - m bounds every block
        k = k if k >= 2 and left - m > 1 else 0  # no mask block when its drafts could not be used
        predraft = predraft and k > 0 and m > 0
        # branch rows (j, rank, token): other candidates beside the mask block's drafts (linear layout)
        alts = [] if predraft or source != "sbd" or not candidates else \
            drafter.alternatives(candidates[:m], len(cache.pending) + m + k, cache.offset)
        q = None
        if temp > 0 and m:  # what the drafts were drawn from: the masked marginals, a branch row's distribution, or
            # one-hot for a lookup token
            q = q_masked[:m] if source == "sbd" else q_branch[:m] if source == "branch" else \
                (mx.arange(vocab)[None] == mx.array(drafts)[:, None]).astype(mx.float32)
        mask_rows = (m + 1 if predraft else 1) * k
        inputs = mx.array(cache.pending + drafts + [tok for _, _, tok in alts] + [MASK_ID] * mask_rows, mx.int32)
        context, tic = cache.offset, time.perf_counter()  # before the graph is built: on the CPU much of the
        # forward runs while it is (a KV cache update evaluates), so a clock started after async_eval saw a fifth
        with mx.stream(generation_stream):
            out = verify_step(model, cache, inputs, m, k, q, gamma=gamma, temp=temp, top_p=top_p, top_k=top_k,
                              predraft=predraft, alts=[j for j, _, _ in alts],
                              want_alts=drafter.ranks if k and not predraft else 0)
        mx.async_eval(*(x for x in out[:5] if isinstance(x, mx.array)), *(x for x in out[5] or () if x is not None))
        drafter.think()  # auto's planning for later forwards, while this one computes
        return out, drafts, alts, mask_rows, inputs.shape[0], source, predraft, (context, tic)

    flight = launch(None, None, None, None, None)
    try:
        while flight is not None:
            (a, n, t, e, q_next, branch), drafts, alts, mask_rows, n_rows, source, predraft, (context, tic) = flight
            flight, m = None, len(drafts)
            rows += n_rows
            if a is None:  # greedy: t holds the causal rows' tokens, then the branch rows'; the agreeing drafts are
                targets = t.tolist()  # counted here. The one wait per forward: the others were evaluated with it
                a = agreed(drafts, targets)
                t, ys = targets[a], targets[m + 1 :]
            else:
                a, t = a.item(), t.item()
                ys = branch[0].tolist() if alts else []
            n, e = n if isinstance(n, int) else n.item(), e.tolist()
            if drafter.cost is not None:  # what this forward took, from its launch: auto's prices follow the device
                drafter.cost.observe(n_rows, context, time.perf_counter() - tic, predraft=predraft,
                                    branch=bool(alts))
            nfe, drafted, accepted = nfe + 1, drafted + m, accepted + a
            drafter.record(source, m, a)
            # a branch row rescues the rejected draft it stands beside when its token is the verifier's: its own
            # causal token (the one after it) is then the next forward's first draft
            hit = next((i for i, (j, _, tok) in enumerate(alts) if j == a and tok == t), None)
            if alts:
                drafter.record_alternatives([(j, r) for j, r, _ in alts], hit)
                rescues += hit is not None
            new = drafts[:a] + [t]  # the accepted drafts (their K/V are in the cache) and t (not yet)
            stop = next((i for i, tok in enumerate(new) if tok in eos_ids), None)
            # EOS ends the conversation: nothing after it is kept. (max_tokens needs no cut here: launch proposes at
            # most left - 1 drafts, so a forward never yields more than what is left.)
            end = len(new) if stop is None else stop + 1
            new = new[:end]
            # Keep K/V of the accepted drafts up to `end`; drop the rejected drafts, the branch rows, the mask blocks
            # and the rest.
            trim_prompt_cache(cache.layers, (m - a) + len(alts) + mask_rows + (a - min(end, a)))
            cache.pending = [t] if end == a + 1 else []  # t is committed; its K/V come with the next forward
            cache.tokens += new
            produced += len(new)
            if stop is not None:
                yield Step(new[:-1], nfe, drafted, accepted, "stop", rows, rescues)
                return
            # the mask block's guesses assumed the drafts before it: with one block they are drafts only when all
            # passed; with pre-drafting the block after d_a was chosen on the device
            valid = mask_rows > 0 and (predraft or a == m)
            if valid:
                drafter.record_kept(mask_rows // (m + 1 if predraft else 1), n)
            others = branch[2] if valid and branch is not None and branch[2] is not None else None
            flight = launch(e[:n] if valid else None, q_next if valid else None,
                            others.tolist()[:n] if others is not None else None,
                            None if hit is None else [ys[hit]],
                            None if hit is None or branch[1] is None else branch[1][hit : hit + 1])
            yield Step(new, nfe, drafted, accepted, rows=rows, rescued=rescues)
        yield Step([], nfe, drafted, accepted, "length", rows, rescues)
    finally:
        if flight is not None:  # closed with a forward in flight: its rows leave the cache, pending stays pending
            mx.eval(*(x for x in flight[0][:5] if isinstance(x, mx.array)))
            trim_prompt_cache(cache.layers, flight[4])


# --- plain next-token decoding -------------------------------------------------------------------------------
def ntp_steps(model: SBDModel, cache: SBDCache, *, sampler, max_tokens: int, max_length: int,
              eos_ids: set) -> Iterator[Step]:
    """block_size=1: plain next-token decoding with mlx_lm's own generate_step, after prefill of all but
    cache.pending (which generate_step takes as its prompt)."""
    prompt, cache.pending = cache.pending, []
    budget = min(max_tokens, max_length - cache.offset - len(prompt))
    nfe = 0
    for token, _ in generate_step(mx.array(prompt), model, max_tokens=budget, sampler=sampler,
                                  prompt_cache=cache.layers):
        nfe += 1  # generate_step has already fed `token` into the cache (it pipelines one step ahead)
        cache.tokens.append(token)
        if token in eos_ids:
            yield Step([], nfe, finish="stop", rows=nfe)
            return
        yield Step([token], nfe, rows=nfe)
    yield Step([], nfe, finish="length", rows=nfe)


# --- the paper's loop (lossy) --------------------------------------------------------------------------------
def prefill_prompt(model: SBDModel, cache: SBDCache, ids: Sequence[int], block_size: int,
                   step: int = 512) -> Tuple[List[int], mx.array]:
    """Prefill a prompt for the lossy loop -> (head, causal log-probabilities [V] of the first answer token).

    The head (split_prompt) opens the first decode block and must not stay in the cache, but the causal path's
    prediction of the first answer token needs it: the whole prompt runs causally and the head's K/V are trimmed
    off again (O(1)), the same forward that prefilling alone would cost plus the head's few tokens."""
    to_prefill, head = split_prompt(cache, ids, block_size)
    first = prefill(model, cache, to_prefill + head, step)
    trim_prompt_cache(cache.layers, len(head))
    return head, first


def split_prompt(cache: SBDCache, ids: Sequence[int], block_size: int) -> Tuple[List[int], List[int]]:
    """(tokens to prefill, head): `head` is the tail of the prompt inside the first decode block, which ends at
    the next multiple of block_size of the whole sequence (cache, pending tokens and prompt)."""
    ids = list(ids)
    h = min((cache.offset + len(cache.pending) + len(ids)) % block_size, len(ids))
    return ids[: len(ids) - h], ids[len(ids) - h :]


def block_forward(model: SBDModel, tokens: List[int], k: int, cache: SBDCache, causal: bool = False) -> mx.array:
    """One lossy SBD forward over `tokens` = [committed-to-be prefix (causal)] + [block of k (sees everything)].

    Returns the block's log-probabilities [k, vocab], led with `causal` by the prefix's last position (the causal
    path's prediction of the block's first token): [k + 1, vocab]. Leaves only the prefix's K/V in the cache.
    """
    h = model.forward(mx.array(tokens), mask=BlockMask(causal_point=len(tokens) - k), cache=cache.layers,
                      return_hidden=True, mask_rows=k)
    trim_prompt_cache(cache.layers, k)
    return log_softmax(model.logits(h[-k - causal :]))


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
    """The paper's loop (lossy), after the prompt is prefilled but its `head` (split_prompt), which opens the first
    block: yields each run of newly finalised tokens (the block's revealed prefix) as it grows.

    The cache only ever holds causal K/V of finalised tokens. A block starts as k masks. Its first forward carries
    the previous block's k tokens (causal: their K/V are committed by this very forward) plus the k masks; later
    forwards carry the block only. After every forward the block's own K/V are trimmed off again. Blocks sit where
    training puts them, at 0, k, 2k, ... of the sequence (masks.training_mask); the prompt's tail after its last
    multiple of k opens the first block as already revealed tokens.

    With `first`, the causal log-probabilities of the first answer token (prefill_prompt), every block's first
    open position takes the causal path's prediction instead of its masked one (`ntp_first`); later blocks get it
    from their first forward, which carries the previous block causally anyway (one more row of logits). When
    the causal token differs from the masked guess there, that forward reveals it alone.
    """
    eos = set(eos_ids)
    ntp_first, causal = first is not None, first
    prev: List[int] = []  # the last finished block: finalised, K/V not yet in the cache
    head = list(head)  # finalised tokens at the start of the current block, not in the cache
    produced = nfe = rows = 0
    while True:  # one block
        start_pos = cache.offset + len(prev)  # absolute position of the block's first token
        # Blocks end at multiples of block_size, as in training. Masks at in-block offsets the model never trained
        # on cost the tiny arithmetic model 92% -> 63% exact match at k=8, gamma=0.1 (BENCHMARKS.md).
        k = min(block_size - start_pos % block_size, len(head) + max_tokens - produced, max_length - start_pos)
        if k <= len(head):
            cache.pending = prev + head
            yield Step([], nfe, finish="length", rows=rows)
            return
        blk = head + [MASK_ID] * (k - len(head))
        done = c = len(head)  # done: the block's finalised prefix; c: its first open position
        while done < k:  # one forward
            rows += len(prev) + k
            blk, causal = lossy_step(model, cache, prev, blk, c, causal if ntp_first else None, select, sample)
            prev, nfe = [], nfe + 1  # prev was committed by that forward
            end = next((i for i in range(done, k) if blk[i] == MASK_ID), k)
            stop = next((i for i in range(done, end) if blk[i] in eos), None)
            if stop is not None:
                cache.pending = blk[: stop + 1]
                cache.tokens += blk[done : stop + 1]
                yield Step(blk[done:stop], nfe, finish="stop", rows=rows)
                return
            if end > done:
                cache.tokens += blk[done:end]
                yield Step(blk[done:end], nfe, rows=rows)
            done = end
        prev, produced, head = blk, produced + k - len(head), []


def lossy_step(model: SBDModel, cache: SBDCache, prev: List[int], blk: List[int], c: int, causal: Optional[mx.array],
               select: Callable, sample: Callable) -> Tuple[List[int], Optional[mx.array]]:
    """One forward of the lossy loop over `prev` (the last finished block, committed by this forward) and the
    block `blk` (MASK_ID where open) -> (the block with this forward's reveals written in, causal log-probabilities
    of the next block's first token when `prev` ran). With `causal` (ntp_first), the first open position `c` takes
    the causal path's prediction: the same tokens seen, the same label trained, and the causal path learns it first.
    The masked guesses at the other positions assume the masked guess at c, so when the causal token differs,
    only c is revealed."""
    k = len(blk)
    with_causal = causal is not None and bool(prev)  # a block's first forward: the previous block runs causally
    logprobs = block_forward(model, prev + blk, k, cache, causal=with_causal)
    if with_causal:
        causal, logprobs = logprobs[0], logprobs[1:]
    current = mx.array(blk, mx.int32)
    masked = current == MASK_ID
    if causal is not None and blk[c] == MASK_ID:
        guess = logprobs[c].argmax()
        logprobs[c] = causal
        values = sample(logprobs)
        reveal = mx.where(guess == values[c], select(logprobs, masked), mx.arange(k) == c)
    else:
        reveal, values = select(logprobs, masked), sample(logprobs)
    return mx.where(reveal & masked, values.astype(mx.int32), current).tolist(), causal  # the one sync per forward
