"""Where verified decoding's drafts come from: the SBD mask block, prompt lookup, or both.

The causal rows of a verified forward check any draft (decode.verify_step), so a draft may come from anywhere and
the output stays the model's own. Three sources:

  sbd     the mask block after the drafts (the SBD adapter): its guesses are the next drafts, usable when the
          verifier accepted every draft they assumed.
  lookup  prompt lookup (Saxena 2023; the n-gram drafts of mlx-lm PRs #1286/#1297): the tokens that followed the
          most recent earlier occurrence of the conversation's last n tokens (n from max_ngram down to min_ngram).
          Needs no adapter: any model gains where the answer copies from the prompt or from itself. Its draft is
          a token, not a distribution: for sampling, q is one-hot.
  corpus  the model's own earlier answers (corpus.Corpus, stored in an adapter folder that has one): the likeliest
          continuation of the conversation's last n tokens there. Like lookup, a token (q one-hot), and no adapter
          weights needed; it drafts where the conversation has nothing to copy, from the model's habits.

`both` runs the mask block and takes its drafts when they are valid (the last forward accepted everything),
lookup's otherwise (the corpus's when prompt lookup has no match), i.e. exactly after the rejections that leave the
mask block with nothing to offer. `lookup` is prompt lookup, then the corpus. `auto`
(the default) chooses source, draft count and mask block per forward from measured costs (Drafter).

Branch rows (the one tree decode.verify_step builds): beside the mask block's drafts, a forward may carry the
block's next-best guesses for draft positions, each a causal row that sees what the draft at its position
sees (masks.branch_spans). When the verifier rejects the draft at a position and its token is the branch row's
candidate, the branch row has already run the model one token further: its causal token is the next forward's
first draft (source `branch`), which passes unless rounding or sampling says otherwise. A branch row costs a row
and never changes the output (its token is only a draft). The block offers BRANCH_RANKS next-best guesses per
position; auto sends the likeliest rows while the chance a row rescues (measured per position and rank,
RESCUE_PRIOR to start) is worth its row at the generation's rate. By default only where forwards run on a GPU: on
the CPU back-end they cost more than they gained (resolve_branch).
"""

from typing import Dict, List, Optional, Sequence, Tuple, Union

import mlx.core as mx
import numpy as np

from .corpus import Corpus
from .costs import ContextCost
from .errors import SBDError
from .model import PerModel
from .planning import Actions, Planner, outlook

DRAFTS = ("auto", "sbd", "lookup", "both", "none")
LAYOUTS = ("linear", "predraft", "auto")  # one mask block after the drafts, or one after each (decode.verify_step)

# Measured (scripts/bench_lookup.py --sweep, BENCHMARKS.md 6): the defaults for prompt lookup.
LOOKUP_MAX_NGRAM = 3
LOOKUP_MIN_NGRAM = 1
LOOKUP_TOKENS = 12  # most lookup drafts per forward (auto sends fewer when they are unlikely to pass)
MASK_BLOCKS_TRIED = 16  # auto weighs mask blocks of 2..16 and the full block_size (a server may ask for 256)
SOLVE_EVERY = 16  # forwards: auto's plan (planning.Planner.solve) is made again this often, each forward chooses by it
SOLVE_TOLERANCE = 0.05  # expected tokens: an outlook that moved more than this since the last solve solves again
OUTLOOK_WEIGHT = 0.125  # of the latest forward in lookup's outlook for later forwards (an average over ~8)
PRICE_ROWS = 32  # auto reads time(rows) for row counts up to a multiple of this (_seconds)
PRICE_TOKENS = 64  # of context: auto reads time(rows) again this often (it moves ~1% per 100 tokens on these CPUs)


def resolve_branch(branch: Union[int, str, None], mode: str) -> Optional[int]:
    """Branch rows per forward -> a count, or None for auto's choice per forward. "auto" is auto's choice with draft
    auto (none in the fixed modes, which have no prices); None is the default: "auto" where the forward runs on a GPU
    (Metal, CUDA), 0 on the CPU back-end, where a branch forward's per-row positions and span mask cost more than
    its rescues gained (held-out chat, BENCHMARKS.md 12)."""
    if branch is None:
        branch = "auto" if mx.default_device() != mx.cpu else 0
    if branch == "auto":
        return None if mode == "auto" else 0
    if not is_count(branch):
        raise SBDError(f"branch must be an integer >= 0 or 'auto' (got {branch!r})")
    return branch


def is_count(value) -> bool:
    """An integer >= 0 (not a bool): what a fixed `branch` must be."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def parse_branch(value: Union[int, str, None]) -> Union[int, str, None]:
    """A --branch flag or a request's `branch` field: None, "auto", or a count ("3" from a command line)."""
    if value is None or value == "auto" or is_count(value):
        return value
    if isinstance(value, str) and value.isdigit():
        return int(value)
    raise SBDError(f"branch must be an integer >= 0 or 'auto' (got {value!r})")


def resolve_draft(draft: str, block_size: Optional[int], verify: bool) -> str:
    """The draft policy a request gets -> one of auto / sbd / lookup / both / none (plain next-token decoding).

    auto: block_size 1 asks for plain decoding; the lossy loop has only the mask block; otherwise auto (Drafter:
    chosen per forward from measured costs, with the mask block only for a model with an SBD adapter)."""
    if not isinstance(draft, str) or draft not in DRAFTS:
        raise SBDError(f"draft must be one of {', '.join(DRAFTS)} (got {draft!r})")
    if draft == "auto":
        if block_size == 1:
            return "none"
        return "auto" if verify else "sbd"
    if draft in ("lookup", "both") and not verify:
        raise SBDError(f"draft={draft} needs verified decoding: lookup drafts are guesses the causal rows must check "
                       "(drop --lossy / verify=False)")
    if draft in ("sbd", "both") and block_size == 1:
        raise SBDError(f"draft={draft} needs a mask block: block_size must be >= 2 (got 1)")
    if draft == "none" and not verify:
        raise SBDError("draft=none is plain next-token decoding; the lossy loop needs the mask block (draft=sbd)")
    return draft


class PromptLookup:
    """Drafts from the conversation itself: the continuation of the most recent earlier occurrence of its longest
    suffix n-gram. The n-gram index grows with the conversation (each token is indexed once), so a proposal costs
    O(new tokens x n), not a scan of the whole context."""

    def __init__(self, max_ngram: int = LOOKUP_MAX_NGRAM, min_ngram: int = LOOKUP_MIN_NGRAM,
                 max_tokens: int = LOOKUP_TOKENS):
        if not 1 <= min_ngram <= max_ngram:
            raise SBDError(f"lookup n-gram sizes need 1 <= min <= max (got {min_ngram}, {max_ngram})")
        self.max_ngram, self.min_ngram, self.max_tokens = max_ngram, min_ngram, max_tokens
        self.index: Dict[int, Dict[Tuple[int, ...], int]] = {n: {} for n in range(min_ngram, max_ngram + 1)}
        self.indexed = 0  # n-grams ending before this position are in the index
        self.matched = 0  # the n of the last proposal's match (0: none)

    def propose(self, tokens: Sequence[int], limit: Optional[int] = None) -> List[int]:
        """Up to `limit` (default max_tokens) drafts to follow `tokens`, which must extend the tokens of the previous
        call (the conversation only grows during one generation); [] when no suffix n-gram occurred before."""
        limit = self.max_tokens if limit is None else min(limit, self.max_tokens)
        L = len(tokens)
        if L - 1 < self.indexed:  # shorter than before: not the same conversation, start over
            self.__init__(self.max_ngram, self.min_ngram, self.max_tokens)
        # Index n-grams ending at every position but the last: the suffix must match an *earlier* occurrence.
        for end in range(self.indexed, L - 1):
            for n, grams in self.index.items():
                if end + 1 >= n:
                    grams[tuple(tokens[end + 1 - n : end + 1])] = end  # later occurrences overwrite: most recent
        self.indexed = max(self.indexed, L - 1)
        if limit <= 0:
            self.matched = 0
            return []
        for n in range(self.max_ngram, self.min_ngram - 1, -1):
            if L >= n:
                end = self.index[n].get(tuple(tokens[L - n :]))
                if end is not None:
                    self.matched = n
                    return list(tokens[end + 1 : end + 1 + limit])
        self.matched = 0
        return []


# Prior acceptance rates, measured on the development prompts of scripts/bench_lookup.py (SmolLM2, n-gram sizes
# 1-3): a lookup draft's first token passes ~20% of the time after a 1-gram match, ~45% after a 2-gram, ~80% after
# a 3-gram; once the first passed, the next ones pass ~80% of the time whatever the match. The mask block's come
# from its adapter (SBDSettings.draft_acceptance, measured on held-out prompts when it was made), else are unknown
# until seen (1/2). Each prior weighs as much as PRIOR_WEIGHT observed drafts.
PRIORS = {("lookup", 1): (0.2, 0.8), ("lookup", 2): (0.45, 0.8), ("lookup", 3): (0.8, 0.8), "branch": (0.95, 0.5)}
# The corpus's, per (n of its first draft's match, strength: that draft's share of the context's continuations,
# corpus.SHARES), measured with the built-in adapter's corpus on the base's answers to the validation prompts of its
# data (stage_data/smollm2-distill3/valid.jsonl, 72 answers, every position drafted): (first draft, later ones).
CORPUS_PRIOR = {(1, 0): (0.145, 0.33), (1, 1): (0.23, 0.28), (1, 2): (0.27, 0.32),
                (2, 0): (0.135, 0.44), (2, 1): (0.21, 0.36), (2, 2): (0.36, 0.38),
                (3, 0): (0.085, 0.44), (3, 1): (0.27, 0.45), (3, 2): (0.44, 0.51),
                (4, 0): (0.13, 0.51), (4, 1): (0.38, 0.57), (4, 2): (0.54, 0.47),
                (5, 0): (0.10, 0.46), (5, 1): (0.31, 0.40), (5, 2): (0.57, 0.59),
                (6, 0): (0.17, 0.62), (6, 1): (0.35, 0.55), (6, 2): (0.75, 0.68)}
DEFAULT_PRIOR = (0.5, 0.5)
PRIOR_WEIGHT = 4.0
MEMORY = 64.0  # observations per position an estimate keeps: older ones fade (halved past twice this), so the
# estimate follows the text (code, chat) while carrying over between generations of one model (chat, server)


# Branch rows (module docstring): the mask block's next-best guesses per draft position a forward may carry, and how
# often the row of rank r (0: the block's second guess) beside draft position j rescued its forward's rejection, per
# row sent, measured with the shipped SmolLM2 adapter on held-out chat and code, every row sent (`eval_drafts.py --n 8
# --branch 21`, BENCHMARKS.md 12; positions past 4 rescued 0-0.5%): RESCUE_PRIOR[r][j], the last position's rate for
# later ones. A rescue is worth about one token (the next forward's first draft, which passes).
BRANCH_RANKS = 3
RESCUE_PRIOR = ((0.12, 0.10, 0.056, 0.031, 0.005),
                (0.054, 0.055, 0.021, 0.022, 0.005),
                (0.029, 0.03, 0.009, 0.009, 0.005))
RESCUE_VALUE = 1.0
RESCUE_PRIOR_WEIGHT = 32.0  # rows: a rescue is a rarer event than a draft passing, so a few misses must not end
# a row's chances (at PRIOR_WEIGHT, 4 misses halved the 12% prior and auto stopped sending it; sent throughout, it
# rescued 18% on held-out chat)
EXPLORE = 16  # forwards: one in this many that declined branch rows sends one of them, so its estimate can recover
# (an unlucky run of misses would otherwise rule a row out for good: an estimate moves only when its row is sent)


class Rescues:
    """Per branch row (draft position j, rank r): how often a row there rescued, from RESCUE_PRIOR (weighing
    RESCUE_PRIOR_WEIGHT rows), fading as Acceptance's estimates do."""

    def __init__(self, prior: Sequence[Sequence[float]] = RESCUE_PRIOR):
        self.prior = [list(p) for p in prior]
        self.counts: Dict[Tuple[int, int], List[float]] = {}  # (j, r) -> [rows sent, rescues]
        self.passed_over: Dict[Tuple[int, int], int] = {}  # (j, r) -> offers auto declined since it was last sent
        self.since_explore = 0  # forwards that declined rows since one was sent to explore

    def _counts(self, j: int, r: int) -> List[float]:
        if (j, r) not in self.counts:
            rates = self.prior[min(r, len(self.prior) - 1)]
            self.counts[j, r] = [RESCUE_PRIOR_WEIGHT, RESCUE_PRIOR_WEIGHT * rates[min(j, len(rates) - 1)]]
        return self.counts[j, r]

    def record(self, rows: Sequence[Tuple[int, int]], rescued: Optional[int]) -> None:
        """A forward sent branch rows `rows` ((j, r) each); the one at index `rescued` (or none) rescued."""
        for i, (j, r) in enumerate(rows):
            self.passed_over[j, r] = 0
            c = self._counts(j, r)
            c[0] += 1
            c[1] += i == rescued
            if c[0] > 2 * MEMORY:
                c[0] *= 0.5
                c[1] *= 0.5

    def rate(self, j: int, r: int) -> float:
        sent, hits = self._counts(j, r)
        return hits / sent

    def explore(self, declined: Sequence[Tuple[int, int]]) -> List[Tuple[int, int]]:
        """Every EXPLORE forwards that declined rows, one of them is sent: the one passed over longest (the likeliest
        of those): exploring costs at most a row per EXPLORE forwards."""
        for jr in declined:
            self.passed_over[jr] = self.passed_over.get(jr, 0) + 1
        self.since_explore += bool(declined)
        if self.since_explore < EXPLORE:
            return []
        self.since_explore = 0
        return [max(declined, key=lambda jr: self.passed_over[jr])]  # max keeps the first (likeliest) of ties


class Acceptance:
    """Per draft position j: how often a draft at j was accepted when the drafts before it were, starting from a
    prior (a rate per position, the last one for every later position) that weighs PRIOR_WEIGHT observations."""

    def __init__(self, prior: Sequence[float] = DEFAULT_PRIOR, size: int = 64):
        rates = list(prior) + [prior[-1]] * (size - len(prior))
        self.tried = [PRIOR_WEIGHT] * size
        self.passed = [PRIOR_WEIGHT * p for p in rates[:size]]

    def record(self, drafted: int, accepted: int) -> None:
        for j in range(min(accepted + (accepted < drafted), len(self.tried))):
            self.tried[j] += 1
            self.passed[j] += j < accepted
            if self.tried[j] > 2 * MEMORY:
                self.tried[j] *= 0.5
                self.passed[j] *= 0.5

    def expected(self, m: int) -> List[float]:
        """[E accepted drafts if the first i are proposed, i = 0..m]: sums of products of the conditional rates."""
        out, run, p = [0.0], 0.0, 1.0
        for j in range(min(m, len(self.tried))):
            p *= self.passed[j] / self.tried[j]
            run += p
            out.append(run)
        return out


_learned = PerModel()


def learned(model, block_size: int) -> dict:
    """The acceptance estimates of this model (and mask block size) in this process, shared by its generations:
    a server or chat stops paying for exploration after its first answers."""
    return _learned.get(model, block_size, dict)


def forget(model) -> None:
    """Drop what this process learned of the model's drafts: its next generation starts from the priors, as in a
    new process (scripts/bench_decode.py --cold)."""
    _learned.drop(model)


class Drafter:
    """The draft policy of one generation: which source's drafts the next verified forward carries, how many, and
    whether it ends in a mask block.

    Fixed modes: sbd (the mask block's drafts, block_size masks every forward), lookup (no mask block), both (the
    mask block's drafts when valid, else lookup's). auto chooses per forward, from time(rows) measured on this device
    (costs.row_cost, read at the current context length) and the acceptance seen so far per source and draft
    position (for lookup, per matched n-gram size: a 3-gram match is a stronger draft than a 1-gram one), the drafts,
    mask block (none, or 2 to block_size masks) and layout that maximise expected tokens per second over the
    generation (planning.py): a forward is worth its expected tokens, 1 + A(m), less its time at the long-run rate,
    plus what it leaves the next forward (the mask block's drafts, valid when all m drafts pass or with
    pre-drafting). A source the cost rules out is not tried again until its estimate says so: on a device where rows
    are nearly free (a GPU at batch 1) drafts are long and the mask block always runs; on these CPUs only likely
    drafts are sent."""

    def __init__(self, mode: str, lookup: Optional[PromptLookup] = None, has_adapter: bool = True, cost=None,
                 block_size: int = 0, layout: str = "linear", acceptance: Optional[dict] = None,
                 sbd_prior: Optional[Sequence[float]] = None, stop: Sequence[int] = (), gamma: float = float("inf"),
                 branch: Union[int, str, None] = None, corpus: Optional[Corpus] = None):
        if layout not in LAYOUTS:
            raise SBDError(f"layout must be one of {', '.join(LAYOUTS)} (got {layout!r})")
        self.mode, self.layout = mode, layout
        uses_lookup = mode in ("lookup", "both", "auto")
        self.lookup = lookup if lookup is not None or not uses_lookup else PromptLookup()
        self.corpus = corpus if uses_lookup else None  # the model's earlier answers (corpus.py), if it has them
        self.block_size = block_size if (mode in ("sbd", "both") or (mode == "auto" and has_adapter)) else 0
        self.cost = cost
        self.sbd_prior = list(sbd_prior) if sbd_prior else list(DEFAULT_PRIOR)  # the mask block's, per position
        # acceptance per source: pass the same dict to every generation of a model to carry it over (learned())
        self.acceptance: Dict[object, Acceptance] = {} if acceptance is None else acceptance
        self.last_key = None
        self.stop = set(stop)  # end-of-sequence ids: generation ends at one, so no draft after it can be used
        self.planner = Planner()  # auto's long-run rate and the values of its states, kept from forward to forward
        self.since_solve = SOLVE_EVERY  # forwards planned since auto's last solve (the first plan solves)
        self.solved_with: dict = {}  # the outlooks (expected accepted drafts per source) the last solve used
        self.solved_prices = None  # and the time(rows) array (_seconds' object: a new one is new prices)
        self.lookup_outlook: Optional[List[float]] = None  # lookup's recent offers (_lookup_outlook)
        self.prices = None  # (key, time(rows) array) last read (_seconds)
        self.problem = None  # what the last plan would have solved with (_solve's arguments): think() uses it
        # how many of a block's guesses the EB rule proposes (all with gamma inf): estimated like acceptance
        self.kept_key = None if gamma == float("inf") else ("kept", gamma)
        # branch rows: a fixed count per forward (0: none), or auto's choice; the default is auto's choice on a GPU and
        # none on the CPU back-end, where they were measured to cost more than they gained (BENCHMARKS.md 12)
        self.branch = resolve_branch(branch, mode)
        self.branching = bool(self.block_size) and self.branch != 0
        self.ranks = BRANCH_RANKS if self.branching else 0  # next-best guesses per position a forward returns
        if self.branching and ("rescues", block_size) not in self.acceptance:
            self.acceptance["rescues", block_size] = Rescues()  # carried over with the acceptance (learned())
        self.rescues = self.acceptance.get(("rescues", block_size))

    def until_stop(self, drafts: List[int]) -> List[int]:
        """`drafts` up to and including the first end-of-sequence token: the rows after it would be wasted (a lookup
        match in a chat prompt runs on into the next turn's template, "<|im_end|>\n<|im_start|>assistant...")."""
        for i, t in enumerate(drafts):
            if t in self.stop:
                return drafts[: i + 1]
        return drafts

    def _lookup(self, tokens: Sequence[int], limit: int) -> List[int]:
        return self.until_stop(self.lookup.propose(tokens, limit))

    def _corpus(self, tokens: Sequence[int], limit: int) -> List[int]:
        return self.until_stop(self.corpus.propose(tokens, limit))

    def propose(self, tokens: Sequence[int], masked: Optional[List[int]], limit: int,
                branch: Optional[List[int]] = None) -> Tuple[List[int], str]:
        """(drafts, source) for the forward after `tokens` in the fixed modes. `masked`: the mask block's drafts when
        valid, else None; `branch`: a branch row's draft (after the rejection it rescued), else None."""
        if branch and limit > 0:
            return self.until_stop(branch[:limit]), "branch"
        if masked and self.mode in ("sbd", "both", "auto"):
            return self.until_stop(masked[:limit]), "sbd"
        if self.lookup is not None:
            drafts = self._lookup(tokens, limit)
            if drafts or self.corpus is None:
                return drafts, "lookup"
            return self._corpus(tokens, limit), "corpus"
        return [], "sbd"

    def plan(self, tokens: Sequence[int], masked: Optional[List[int]], limit: int, pending: int,
             room: int, context: int = 0, branch: Optional[List[int]] = None) -> Tuple[List[int], str, int, bool]:
        """(drafts, source, mask block size, pre-drafting) of the next forward; `room` bounds drafts + masks;
        `context`: the tokens already in the KV cache, which every row attends to (rows cost more over a longer one);
        `branch`: a branch row's draft, when the last forward's rejection was rescued (propose)."""
        if self.mode != "auto" or self.cost is None:
            drafts, source = self.propose(tokens, masked, limit, branch)
            self.last_key = source
            return drafts, source, self.block_size, self.layout == "predraft"  # fixed modes: auto layout = linear
        sources = []  # (drafts, source, acceptance key) open to the next forward
        if branch:
            sources.append((self.until_stop(branch[:limit]), "branch", "branch"))
        if masked:
            sources.append((self.until_stop(masked[:limit]), "sbd", "sbd"))
        if self.lookup is not None:
            sources.append((self._lookup(tokens, limit), "lookup", ("lookup", self.lookup.matched)))
        if self.corpus is not None:
            sources.append((self._corpus(tokens, limit), "corpus", ("corpus", self.corpus.matched,
                                                                     self.corpus.strength)))
        sources = sources or [([], "sbd", "sbd")]
        # A mask block of 2..block_size masks (training drew k ~ U{2..block_size_max}; fewer masks are fewer rows and
        # fewer drafts for the next forward) or none; a tie goes to the larger block (its drafts are news the
        # estimate cannot price yet).
        top = self.block_size
        blocks = (0,)
        if top >= 2:
            blocks = tuple(sorted({top, *range(2, min(top, MASK_BLOCKS_TRIED) + 1)}, reverse=True)) + (0,)
        layouts = {"linear": (False,), "predraft": (True,), "auto": (False, True)}[self.layout]
        # the outlook of later forwards: the mask block's drafts when valid; lookup's as they have been lately
        sbd_later = self._rate("sbd").expected(self.block_size - 1) if self.block_size else None
        lookup_later = self._lookup_outlook(sources)
        drafts_most = max([len(d) for d, _, _ in sources]
                          + [len(x) - 1 for x in (sbd_later, lookup_later) if x is not None])
        longest = max(len(d) for d, _, _ in sources)
        most = max(pending, 1) + drafts_most + (drafts_most + 1) * blocks[0]  # the most rows an action can have
        # time(rows) at this context for every row count an action can have
        seconds = self._seconds(most, context)
        outlooks = {"sbd": sbd_later}  # (lookup's average outlook moves slowly by design: solved on schedule)
        for _, _, key in sources:
            if key != "sbd":
                outlooks[key] = self._rate(key).expected(self.lookup.max_tokens)
        self.problem = (sbd_later, lookup_later, blocks, layouts, seconds, outlooks)  # think()'s, if called
        # solve on schedule, when an estimate moved, or when time(rows) was read again; else the last solution serves
        if self.since_solve >= SOLVE_EVERY or seconds is not self.solved_prices or self._moved(outlooks):
            self._solve(*self.problem)
        self.solved_with = {**outlooks, **self.solved_with}  # a new lookup key: its table is made from this
        self.since_solve += 1
        if pending == 1 and longest < limit and longest + blocks[0] <= room:  # the usual forward: from the tables
            best = None
            for n, (drafts, _, key) in enumerate(sources):
                values, actions = self.planner.table(key, outlooks.get(key) or [0.0], seconds)
                m = int(np.argmax(values[: len(drafts) + 1]))  # the first maximum: the fewest drafts
                if best is None or values[m] > best[0]:
                    best = (values[m], n, m, *actions[m])
            _, n, m, b, predraft = best
        else:  # after a prompt (several pending tokens), or near max_tokens / the context's end: every bound applied
            options = [Actions(self._rate(key).expected(len(drafts)), blocks, layouts, pending, limit, room)
                       for drafts, _, key in sources]
            n, (m, b, predraft) = self.planner.choose(options, seconds)
        drafts, source, self.last_key = sources[n]
        return drafts[:m], source, blocks[b], bool(predraft)

    def think(self) -> None:
        """auto's scheduled solve, and the tables the next forwards choose from, made while a forward runs: the
        decode loop calls this after launching one, and on the CPU back-end the forward computes on its own thread,
        so this work leaves the path between forwards. It solves with what the last plan() had (one forward older
        than the next plan() would use); an estimate that then moves past SOLVE_TOLERANCE still solves in plan()."""
        if self.mode != "auto" or self.problem is None or self.since_solve < SOLVE_EVERY:
            return
        self._solve(*self.problem)
        *_, seconds, outlooks = self.problem
        for key, expected in outlooks.items():
            self.planner.table(key, expected or [0.0], seconds)

    def _solve(self, sbd_later, lookup_later, blocks, layouts, seconds, outlooks) -> None:
        """Solve for the plan with these outlooks of later forwards and time(rows) (planning.Planner.solve)."""
        kept = self._rate(self.kept_key).expected(self.block_size) if self.kept_key and self.block_size else None
        scale = self.cost.predraft_scale() if isinstance(self.cost, ContextCost) else 1.0
        self.planner.solve(sbd_later, lookup_later, blocks, layouts, seconds, predraft_scale=scale,
                           kept=None if kept is None else outlook(kept)[1])
        self.solved_with, self.solved_prices, self.since_solve = dict(outlooks), seconds, 0

    def _moved(self, outlooks: dict) -> bool:
        """Whether an outlook the last solve (or a table made since) used has moved by more than SOLVE_TOLERANCE
        expected tokens: a plan made before a run of passing (or failing) drafts must not outlive it."""
        for key, now in outlooks.items():
            then = self.solved_with.get(key, now)
            if (then is None) != (now is None):
                return True
            if now is not None and (len(then) != len(now)
                                    or max(abs(a - b) for a, b in zip(then, now)) > SOLVE_TOLERANCE):
                return True
        return False

    def _seconds(self, most: int, context: int) -> np.ndarray:
        """time(rows) for rows = 0..most at `context` (read again every PRICE_TOKENS of context, or when the table
        was measured again); `most` is rounded up to PRICE_ROWS, so a forward's longer proposal rarely reads again."""
        most = -(-most // PRICE_ROWS) * PRICE_ROWS
        key = (most, context // PRICE_TOKENS, getattr(self.cost, "version", 0))
        if self.prices is None or self.prices[0] != key:
            times = np.asarray(self.cost(np.arange(most + 1), context), dtype=np.float64)
            self.prices = (key, np.broadcast_to(times, (most + 1,)))
        return self.prices[1]

    def _lookup_outlook(self, sources) -> Optional[List[float]]:
        """What lookup will offer later forwards: the expected accepted drafts (A(m), m = 0..max_tokens) of its
        proposals (prompt lookup's or the corpus's, whichever offers more), averaged over the recent forwards
        (OUTLOOK_WEIGHT per forward; a forward with no match offers nothing), so the plan follows the text's run of
        matches rather than this forward's alone. Plain Python: a dozen numbers per forward, where numpy's calls
        cost more than the arithmetic."""
        if self.lookup is None:
            return None
        expected = max((self._rate(key).expected(len(drafts)) for drafts, name, key in sources
                        if name in ("lookup", "corpus")), key=lambda x: x[-1])
        size = self.lookup.max_tokens + 1
        now = expected[:size] + [expected[-1]] * (size - len(expected))
        old = self.lookup_outlook
        if old is None or len(old) != size:
            self.lookup_outlook = now
        else:
            self.lookup_outlook = [a + OUTLOOK_WEIGHT * (b - a) for a, b in zip(old, now)]
        return self.lookup_outlook

    def _rate(self, key) -> Acceptance:
        if key not in self.acceptance:
            if key == "sbd":
                prior = self.sbd_prior
            elif isinstance(key, tuple) and key[0] == "lookup" and key[1]:
                prior = PRIORS.get(("lookup", min(key[1], 3)), DEFAULT_PRIOR)
            elif isinstance(key, tuple) and key[0] == "corpus" and key[1]:
                prior = CORPUS_PRIOR.get((min(key[1], 6), key[2]), DEFAULT_PRIOR)
            elif key == "branch":
                prior = PRIORS["branch"]
            else:  # lookup with no match, or the EB rule's kept drafts (key ("kept", gamma))
                prior = DEFAULT_PRIOR
            self.acceptance[key] = Acceptance(prior)
        return self.acceptance[key]

    def alternatives(self, candidates: Sequence[Sequence[int]], rows: int,
                     context: int = 0) -> List[Tuple[int, int, int]]:
        """The branch rows a forward of `rows` rows carries, as (draft index j, rank r, token) by position:
        `candidates[j]` are the mask block's next-best guesses for the position of draft j, best first. The rows
        most likely to rescue (Rescues) first: the fixed count of them, or auto's, rows while a row's chance to
        rescue is worth more than its time at the generation's rate (planning.Planner.rho, tokens per second), and
        now and then one it declined (Rescues.explore)."""
        if not self.branching or not candidates:
            return []
        ranked = sorted(((self.rescues.rate(j, r), j, r) for j, c in enumerate(candidates) for r in range(len(c))),
                        key=lambda x: -x[0])
        if self.branch is not None:
            chosen = ranked[: self.branch]
        else:
            rho = self.planner.rho
            if self.cost is None or not rho:
                return []
            most = rows + len(ranked)
            seconds = self.prices[1] if self.prices is not None and len(self.prices[1]) > most else \
                self._seconds(most, context)
            # n rows: their chances to rescue, less the forward's added time at the generation's rate; a forward with
            # branch rows costs layout_scale times the table (its per-row positions and span mask)
            scale = self.cost.layout_scale("branch") if isinstance(self.cost, ContextCost) else 1.0
            gain = np.cumsum([0.0] + [rate * RESCUE_VALUE for rate, _, _ in ranked])
            extra = np.concatenate([[0.0], seconds[rows + 1 : most + 1] * scale - seconds[rows]])
            n = int(np.argmax(gain - rho * extra))  # the first maximum: the fewest rows
            chosen = ranked[:n] + [(0.0, j, r) for j, r in self.rescues.explore([(j, r) for _, j, r in ranked[n:]])]
        return sorted((j, r, candidates[j][r]) for _, j, r in chosen)

    def record_alternatives(self, rows: Sequence[Tuple[int, int]], rescued: Optional[int]) -> None:
        """A forward carried branch rows `rows` ((j, r) each); the one at index `rescued` (or none) rescued."""
        if self.rescues is not None:
            self.rescues.record(rows, rescued)

    def record_kept(self, block: int, proposed: int) -> None:
        """A valid mask block of `block` masks offered `proposed` drafts (the EB rule keeps the first always)."""
        if self.kept_key is not None and block > 2:
            self._rate(self.kept_key).record(block - 2, proposed - 1)

    def record(self, source: str, drafted: int, accepted: int) -> None:
        """Count how the last plan's drafts did (under its source and n-gram size)."""
        if drafted:
            self._rate(self.last_key if self.last_key is not None else source).record(drafted, accepted)
