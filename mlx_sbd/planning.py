"""auto's choice of the next verified forward (drafting.Drafter): the drafts, mask block and layout that maximise
tokens per second over the generation, not over one forward.

A forward's own rate, (tokens it yields) / time(rows), undervalues a mask block: the block's guesses are the next
forward's drafts when every draft before it passes, and a forward with nothing to verify yields one token. On
held-out chat (BENCHMARKS.md 8) that per-forward rule alternated, drafts without a block and then a block without
drafts, at 1.64 tokens per forward, where the fixed linear layout k=4 chained them at 1.86.

So auto plans on a semi-Markov decision process over what the next forward can draft from:
    S_0  no valid mask-block drafts (only prompt lookup's, if any)
    S_j  j valid mask-block drafts (a block of j + 1 masks whose assumptions all held), and lookup's
An action (source, m drafts, k masks, linear or pre-drafting) yields 1 + A(m) tokens (A: the expected accepted
drafts of the first m) in time(rows) and leads to S_{k-1} with probability P_all(m) (1 with pre-drafting: the next
drafts exist whatever passes), else to S_0. auto maximises the long-run rate rho = E[tokens] / E[time]. With
h(S_0) = 0,
    h(S_j) = max over the actions open in S_j of  tokens - rho * time + P * h(S_{k-1})
and rho is the rate at which S_0's own equation holds (its max is 0): Dinkelbach's update, rho <- tokens / time of
one cycle from S_0 back to S_0 under the current choices, with h and rho from each policy's exact evaluation
(policy iteration: a dense solve over the states, the discount below making the values defined). The next forward
is the action that maximises tokens - rho * time + P * h(next) in the state decoding is in. Lookup's future drafts
are taken to be like its recent ones (Drafter._lookup_outlook). Its inputs (the estimates, time(rows) at the
current context) move slowly, so the Drafter solves every few forwards (drafting.SOLVE_EVERY, or sooner when an
estimate moved), each solve starting from the last one's rho, h and choices, and a forward picks from per-source
tables of the best action by draft count made from the last solve (Planner.table): on the 1-layer model of
scripts/bench_overhead.py that costs ~0.1 ms per forward.
"""

from functools import lru_cache
from typing import List, Optional, Sequence, Tuple

import numpy as np

HORIZON = 64  # forwards: later ones count less (a discount of 1 - 1/HORIZON per forward), as a generation ends
ROUNDS = 16  # most policy-iteration rounds per solve (a few from a cold start, usually one from the last forward's)
DISCOUNT = 1.0 - 1.0 / HORIZON
ROUNDING = 1e-12


def outlook(expected: Sequence[float]) -> Tuple[np.ndarray, np.ndarray]:
    """(A(m), P_all(m)) for m = 0..M from Acceptance.expected(M): the chance all of the first m pass is the m-th term
    of the expected sum."""
    gain = np.asarray(expected, dtype=np.float64)
    return gain, np.concatenate([[1.0], np.diff(gain)])


@lru_cache(maxsize=256)
def _grid(drafts: int, blocks: Tuple[int, ...], layouts: Tuple[bool, ...], pending: int, limit: Optional[int],
          room: Optional[int]):
    """The shape of every action of one source with up to `drafts` drafts, as arrays [M + 1, K, 2] (last axis: linear,
    pre-drafting): rows, allowed, the block's index in `blocks`, and the masks that pick tokens and chances. Ordered
    m ascending, k as given (descending, 0 last), linear first: argmax's first maximum is the fewest drafts, the
    largest block, linear."""
    m = np.arange(drafts + 1)[:, None, None]
    k = np.asarray(blocks)[None, :, None]
    pre = np.array([False, True])[None, None, :]
    rows = pending + m + np.where(pre, m + 1, 1) * k  # pre-drafting: a block after x and one after each draft
    ok = np.where(pre, (k > 0) & (m > 0) & (True in layouts), (False in layouts) | (k == 0) | (m == 0))
    if limit is not None:
        ok &= (m <= limit) & ((k == 0) | (m < limit))  # a block after the last allowed token is never used
    if room is not None:
        ok &= m + k <= room
    shape = rows.shape
    block = np.arange(len(blocks))[None, :, None]
    return rows, np.broadcast_to(ok, shape), np.broadcast_to(block, shape), np.broadcast_to(k == 0, shape), \
        np.broadcast_to(pre, shape)


class Actions:
    """One source's actions [M + 1, K, 2] with its outlook: what each yields, costs and leaves."""

    def __init__(self, expected: Sequence[float], blocks: Tuple[int, ...], layouts: Tuple[bool, ...],
                 pending: int = 1, limit: Optional[int] = None, room: Optional[int] = None):
        gain, p_all = outlook(expected)
        drafts = len(gain) - 1
        # the bounds only where they bind, so that the grids of most forwards are one cached grid
        limit = limit if limit is not None and limit <= drafts else None
        room = room if room is not None and room < drafts + max(blocks) else None
        self.rows, self.ok, self.block, no_block, self.pre = _grid(drafts, blocks, layouts, pending, limit, room)
        self.tokens = 1.0 + gain[:, None, None]
        self.chance = np.where(no_block, 0.0, np.where(self.pre, 1.0, p_all[:, None, None]))

    def seconds(self, seconds: np.ndarray, predraft_scale: float) -> np.ndarray:
        """Each action's time: time(rows), times predraft_scale for pre-drafting (costs.ContextCost.predraft_scale)."""
        return seconds[self.rows] * np.where(self.pre, predraft_scale, 1.0)

    def values(self, rho: float, seconds: np.ndarray, h: np.ndarray, after: np.ndarray,
               predraft_scale: float = 1.0) -> np.ndarray:
        """tokens - rho * time + what the next state is worth, discounted; -inf where not allowed. after[b]: the
        worth of the drafts block b leaves (arrivals @ h)."""
        later = self.chance * after[self.block] + (1.0 - self.chance) * h[0]
        time = self.seconds(seconds, predraft_scale)
        return np.where(self.ok, self.tokens - rho * time + DISCOUNT * later, -np.inf)


@lru_cache(maxsize=64)
def arrivals(blocks: Tuple[int, ...], states: int, kept: Optional[Tuple[float, ...]] = None) -> np.ndarray:
    """[K, states]: the chance that a valid block of blocks[b] masks leaves n drafts, S_n. Its k - 1 guesses are all
    drafts with gamma = inf; with a finite gamma the EB rule keeps the first, and each later one while the entropies
    before it sum to <= gamma: kept[i] is the chance that i more than the first are kept (the terms P_all of an
    Acceptance estimate of the rule's own record, Drafter.record_kept), so n = 1 + min(k - 2, N) with P(N >= i) = kept[i].
    Cached (the result is shared: read it, never write it)."""
    out = np.zeros((len(blocks), states))
    for b, k in enumerate(blocks):
        if k < 2:
            out[b, 0] = 1.0
            continue
        tail = np.zeros(k)  # P(N >= i) for i < k - 1; P(N >= k - 1) does not matter: the block has k - 1 guesses
        if kept is None:
            tail[: k - 1] = 1.0
        else:  # past the estimate's positions (64), nothing more is kept
            tail[: min(k - 1, len(kept))] = kept[: k - 1]
        out[b, 1:k] = tail[:-1] - tail[1:]
    return out


class Planner:
    """rho, h and the choices they imply, carried from one forward's solve to the next."""

    def __init__(self):
        self.rho: Optional[float] = None
        self.h = np.zeros(1)
        self.policy: Optional[np.ndarray] = None
        self.arrivals = np.ones((1, 1))
        self.scale = 1.0
        self.tables: dict = {}

    def solve(self, sbd: Optional[Sequence[float]], lookup: Optional[Sequence[float]], blocks: Tuple[int, ...],
              layouts: Tuple[bool, ...], seconds: np.ndarray, kept: Optional[Sequence[float]] = None,
              predraft_scale: float = 1.0) -> None:
        """Update rho and h. sbd / lookup: each source's expected accepted drafts (Acceptance.expected; None: no such
        source); blocks: the mask blocks weighed, descending, 0 (none) last; seconds[rows]: time(rows); kept: how
        many of a block's guesses the EB rule keeps (arrivals; None: all); predraft_scale: a pre-drafting
        forward's time over time(rows) (Actions.seconds)."""
        self.scale, self.blocks, self.layouts, self.tables = predraft_scale, blocks, layouts, {}
        states = max(blocks[0], 1)  # S_0 .. S_{max k - 1}
        self.arrivals = arrive = arrivals(blocks, states, None if kept is None else tuple(kept))
        h = np.zeros(states)
        h[: min(states, len(self.h))] = self.h[:states]
        # S_0's actions: lookup's drafts (or none), each with or without a block; S_j adds the first j sbd drafts
        shared = Actions(lookup if lookup is not None else [0.0], blocks if sbd is not None else (0,), layouts)
        own = Actions(sbd, blocks, layouts) if sbd is not None else None
        rho = self.rho
        if rho is None:  # a start: the best one-forward rate
            rho = float(np.max(np.where(shared.ok, shared.tokens / shared.seconds(seconds, predraft_scale), 0.0)))
        policy = self.policy if self.policy is not None and len(self.policy) == states else None
        for _ in range(ROUNDS):  # policy iteration; each evaluation also updates rho (Dinkelbach)
            chosen, tokens, time, chance, block = greedy(shared, own, rho, seconds, h, arrive @ h, predraft_scale)
            stable = policy is not None and np.array_equal(chosen, policy)
            policy = chosen
            # discounted sums of tokens and of time from each state: (I - d P) x = per-forward amounts
            move = chance[:, None] * arrive[block]
            move[:, 0] += 1.0 - chance
            x = np.linalg.solve(np.eye(states) - DISCOUNT * move, np.stack([tokens, time], axis=1))
            rho = float(x[0, 0] / x[0, 1])  # from S_0: tokens / time
            h = x[:, 0] - rho * x[:, 1]  # h(S_0) = 0 up to rounding
            h[np.abs(h) < ROUNDING] = 0.0  # so that a mask block worth nothing ties with none (the larger wins)
            if stable:  # the choices the last values implied are the ones evaluated: done (usually the first
                break  # round of a forward, whose inputs moved little since the last)
        self.policy = policy
        self.rho, self.h = rho, h

    def table(self, key, expected: Sequence[float], seconds: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        """For one source (acceptance key, its estimate A(0..M)): per m drafts, the best value over (block, layout)
        and that action's (block index, layout), at the last solve's rho and h, from the state after a forward
        (one pending token, no bound). Made once per source per solve: most forwards choose from these tables."""
        if key not in self.tables:
            a = Actions(expected, self.blocks, self.layouts)
            q = a.values(self.rho, seconds, self.h, self.arrivals @ self.h, self.scale).reshape(len(a.rows), -1)
            i = q.argmax(axis=1)
            self.tables[key] = (q[np.arange(len(q)), i], np.stack(np.divmod(i, 2), axis=1))
        return self.tables[key]

    def choose(self, options: List[Actions], seconds: np.ndarray) -> Tuple[int, Tuple[int, int, int]]:
        """(option index, (m, block index, layout)) of the action maximising tokens - rho * time + P * h(next) among
        `options` (the sources' actions from the state decoding is in); the first maximum on ties."""
        best, after = None, self.arrivals @ self.h
        for n, a in enumerate(options):
            q = a.values(self.rho, seconds, self.h, after, self.scale)
            i = int(q.argmax())
            if best is None or q.flat[i] > best[0]:
                best = (q.flat[i], n, np.unravel_index(i, q.shape))
        return best[1], tuple(int(x) for x in best[2])


def greedy(shared: Actions, own: Optional[Actions], rho: float, seconds: np.ndarray, h: np.ndarray,
           after: np.ndarray, scale: float):
    """The best action of every state -> (the policy: which candidate and action, [states, 2]; tokens, seconds, chance,
    block index: arrays [states]).
    S_0 takes the best of `shared`; S_j (j >= 1) the best of `shared` and `own`'s rows m <= j (m sbd drafts)."""
    def best_per_row(a: Actions, q: np.ndarray):  # q [rows, actions] -> each row's best action
        i = q.argmax(axis=1)
        r = np.arange(len(q))
        flat = lambda x: np.broadcast_to(x, a.rows.shape).reshape(len(q), -1)[r, i]  # noqa: E731
        return q[r, i], i, flat(a.tokens), flat(a.seconds(seconds, scale)), flat(a.chance), flat(a.block)

    # candidates: 0 = S_0's best, 1 + m = the best with m sbd drafts
    cand = best_per_row(shared, shared.values(rho, seconds, h, after, scale).reshape(1, -1))
    if own is not None:
        more = best_per_row(own, own.values(rho, seconds, h, after, scale).reshape(len(own.rows), -1))
        cand = tuple(np.concatenate(pair) for pair in zip(cand, more))
    value = cand[0]
    # the running best over candidates 0..c (the first maximum on ties): which candidate it is
    best = np.maximum.accumulate(value)
    improves = np.concatenate([[True], value[1:] > best[:-1]])
    which = np.maximum.accumulate(np.where(improves, np.arange(len(value)), 0))
    j = np.arange(len(h))
    picked = which[np.where(j == 0, 0, np.minimum(j + 1, len(value) - 1))]  # S_j: candidates 0..j + 1
    chosen = np.stack([picked, cand[1][picked]], axis=1)  # (candidate, its action): the policy
    return (chosen,) + tuple(x[picked] for x in cand[2:])
