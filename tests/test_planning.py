"""auto's long-run rule (planning.py) against references that share none of its code: every stationary policy of
small decision processes enumerated and evaluated with a dense solve, and decoding simulated forward by forward."""

import itertools

import numpy as np
import pytest

from mlx_sbd.drafting import Drafter
from mlx_sbd.planning import DISCOUNT, Actions, Planner


def expected(rates, m):
    """[A(0..m)]: A(i) = sum over j <= i of prod(rates[:j]) (the last rate repeats)."""
    p = list(rates) + [rates[-1]] * m
    return [sum(float(np.prod(p[:j])) for j in range(1, i + 1)) for i in range(m + 1)]


def arrivals_of(k, kept, states):
    """The chance of S_n after a valid block of k masks, by hand: the EB rule keeps the first guess, then each next
    one with probability kept[i] (the i-th after the first, given the ones before were kept), k - 1 at most."""
    out = np.zeros(states)
    if k < 2:
        out[0] = 1.0
        return out
    p = list(kept or [1.0]) + [(kept or [1.0])[-1]] * k
    alive = 1.0
    for n in range(1, k):
        stop = 1 - p[n - 1] if n < k - 1 else 1.0  # at n = k - 1 the block has no more guesses
        out[n] = alive * stop
        alive *= 1 - stop
    return out


def actions_of(j, sbd, lookup, block_size, cost, layouts=(False, True), scale=1.0):
    """Every action open in S_j, written out: (source, m, k, predraft, tokens, seconds, chance, k)."""
    sources = [("none", [], 0)]
    if sbd is not None and j:
        sources.append(("sbd", sbd, j))
    if lookup is not None:
        sources.append(("lookup", *lookup))
    out = []
    for name, rates, most in sources:
        for m in range(name != "none", most + 1):  # (m = 0 is the same action from every source)
            a = expected(rates or [0.0], m)
            p_all = float(np.prod((list(rates) + [rates[-1]] * m)[:m])) if m else 1.0
            for k in ([0] + list(range(2, block_size + 1)) if sbd is not None else [0]):
                for pre in layouts:
                    if pre and not (k and m):
                        continue
                    if not pre and k and m and False not in layouts:
                        continue
                    rows = 1 + m + (m + 1 if pre else 1) * k
                    chance = 0.0 if not k else (1.0 if pre else p_all)
                    out.append((name, m, k, pre, 1 + a[m], cost(rows) * (scale if pre else 1.0), chance, k))
    return out


def best_by_enumeration(sbd, lookup, block_size, cost, layouts=(False, True), kept=None, scale=1.0):
    """The best discounted tokens / time from S_0 over every stationary policy, and each state's best value at that
    rate (h*) -> (rho*, h*, every state's actions)."""
    states = max(block_size, 1) if sbd is not None else 1
    per_state = [actions_of(j, sbd, lookup, block_size, cost, layouts, scale) for j in range(states)]
    results = []
    for policy in itertools.product(*per_state):
        move = np.zeros((states, states))
        for j, (*_, chance, k) in enumerate(policy):
            move[j] += chance * arrivals_of(k, kept, states)
            move[j, 0] += 1 - chance
        amounts = np.array([[a[4], a[5]] for a in policy])
        results.append(np.linalg.solve(np.eye(states) - DISCOUNT * move, amounts))
    rho = max(x[0, 0] / x[0, 1] for x in results)
    h = np.max([x[:, 0] - rho * x[:, 1] for x in results], axis=0)
    return rho, h, per_state


def value(action, rho, h, kept=None):
    *_, tokens, seconds, chance, k = action
    return tokens - rho * seconds + DISCOUNT * (chance * arrivals_of(k, kept, len(h)) @ h + (1 - chance) * h[0])


@pytest.mark.parametrize("seed", range(8))
def test_the_planner_finds_the_best_policy_of_every_state(seed):
    """Random acceptance, costs, sources and EB-rule cuts over blocks of up to 3 masks: the planner's rate is the best
    of all stationary policies (each evaluated exactly), and its choice in every state is a best action there."""
    rng = np.random.default_rng(seed)
    block_size = 3
    sbd = list(rng.uniform(0.2, 0.95, size=2))
    lookup = (list(rng.uniform(0.1, 0.9, size=2)), 2) if seed % 2 else None
    kept = list(rng.uniform(0.1, 0.9, size=2)) if seed % 4 >= 2 else None
    slope = rng.uniform(0.01, 0.4)
    cost = lambda rows, context=0: 1.0 + slope * np.maximum(np.asarray(rows) - 1, 0) ** 0.9  # noqa: E731
    rho, h, per_state = best_by_enumeration(sbd, lookup, block_size, cost, kept=kept)

    blocks = (3, 2, 0)
    seconds = cost(np.arange(64))
    planner = Planner()
    planner.solve(expected(sbd, block_size - 1), expected(lookup[0], lookup[1]) if lookup else None, blocks,
                  (False, True), seconds, kept=None if kept is None else np.cumprod([1.0] + kept))
    assert planner.rho == pytest.approx(rho, rel=1e-9)
    for j, actions in enumerate(per_state):
        options, names = [], []
        if j:
            options.append(Actions(expected(sbd, j), blocks, (False, True)))
            names.append("sbd")
        if lookup:
            options.append(Actions(expected(*lookup), blocks, (False, True)))
            names.append("lookup")
        options = options or [Actions([0.0], blocks, (False, True))]
        n, (m, b, pre) = planner.choose(options, seconds)
        mine = next(a for a in actions if a[1:4] == (m, blocks[b], bool(pre)) and (a[0] == names[n] if m else True))
        best = max(value(a, rho, h, kept) for a in actions)
        assert value(mine, rho, h, kept) == pytest.approx(best, abs=1e-9)


def chosen_is_best(drafter, masked, sbd, block_size, cost, scale=1.0):
    """Drafter.plan's choice in S_len(masked) (no lookup match) is a best action there by enumeration."""
    rho, h, per_state = best_by_enumeration(sbd, None, block_size, cost, scale=scale)
    drafts, source, k, pre = drafter.plan([1, 2, 3, 4, 5, 6], masked, 10, 1, 100)
    actions = per_state[len(masked)]
    mine = next(a for a in actions if a[1:4] == (len(drafts), k, pre))
    assert value(mine, rho, h) == pytest.approx(max(value(a, rho, h) for a in actions), abs=1e-9)
    return len(drafts), k, pre


def test_auto_starts_from_the_adapters_measured_acceptance():
    """An adapter that records how its drafts did on held-out prompts (SBDSettings.draft_acceptance) gives auto its
    starting estimate per position: the first plan is the best one for those rates, not for the blind 1/2."""
    cost = lambda rows, context=0: 1 + 0.05 * np.maximum(np.asarray(rows) - 1, 0)  # noqa: E731
    measured = [0.7, 0.2, 0.1]  # later positions take the last rate
    choices = {}
    for name, prior in (("measured", measured), ("none", None)):
        d = Drafter("auto", has_adapter=True, cost=cost, block_size=4, sbd_prior=prior, layout="auto")
        choices[name] = chosen_is_best(d, [7, 8, 9], prior or [0.5], 4, cost)
    assert choices["measured"] != choices["none"], choices  # the measured rates changed the choice


def test_auto_sizes_the_mask_block_to_the_cost_of_rows():
    """A mask block's later drafts rarely pass (here 0.8, then 0.2, then 0.05) and every row costs a tenth of a
    forward: a short block pays and the full one does not, so auto sends a block between 2 and block_size masks."""
    cost = lambda rows, context=0: 1 + 0.1 * np.maximum(np.asarray(rows) - 1, 0)  # noqa: E731
    prior = [0.8, 0.2, 0.05]
    d = Drafter("auto", has_adapter=True, cost=cost, block_size=4, sbd_prior=prior, layout="auto")
    m, k, pre = chosen_is_best(d, [7, 8, 9], prior, 4, cost)
    assert 2 <= k < 4, (m, k, pre)


# time(rows) over 256 cached tokens measured on the 2-core x86_64 development machine (OpenBLAS, float32, session 19)
CPU_TABLE = {1: 0.0623, 2: 0.0714, 4: 0.0877, 8: 0.1013, 16: 0.1356, 32: 0.1979}
CHAT = [0.641, 0.5862, 0.4949, 0.5208, 0.48]  # the shipped adapter's held-out acceptance per position


def one_forward_rule(masked, cost, block_size, rates):
    """The rule auto had before (sessions 16-19): the forward with the best own rate, (1 + A(m) + P_all(m) A(k - 1))
    / time(1 + m + k), linear layout; a block's drafts are worth what they would yield next time."""
    best, a = None, expected(rates, max(len(masked), block_size))
    for m in range(len(masked) + 1):
        for k in list(range(block_size, 1, -1)) + [0]:
            p_all = a[m] - a[m - 1] if m else 1.0
            rate = (1 + a[m] + (p_all * a[k - 1] if k else 0.0)) / cost(1 + m + k)
            if best is None or rate > best[0]:
                best = (rate, m, k)
    return best[1], best[2], False


def simulate(choose, forwards, rates, cost, seed):
    """Decode `forwards` forwards in which draft j passes with probability rates[j] once the ones before it passed
    -> tokens per second. choose(masked drafts) -> (m, k, predraft)."""
    rng = np.random.default_rng(seed)
    p = list(rates) + [rates[-1]] * 64
    masked, tokens, seconds = [], 0, 0.0
    for _ in range(forwards):
        m, k, pre = choose(masked)
        a = 0
        while a < m and rng.random() < p[a]:
            a += 1
        tokens += a + 1
        seconds += cost(1 + m + (m + 1 if pre else 1) * k)
        masked = list(range(k - 1)) if k and (pre or a == m) else []
    return tokens / seconds


def test_auto_outruns_the_one_forward_rule_and_every_fixed_layout_in_simulation():
    """With the CPU's time(rows) and the chat acceptance of the shipped adapter, decoding driven by Drafter.plan
    yields more tokens per second than the rule it replaced (which alternated: drafts without a block, then a block
    without drafts) and than the linear layout at any fixed block size."""
    from mlx_sbd.costs import RowCost

    cost = RowCost(CPU_TABLE)
    drafter = Drafter("auto", has_adapter=True, cost=lambda rows, context=0: cost(rows), block_size=8,
                      layout="auto", sbd_prior=CHAT, acceptance={})
    tokens = list(range(1000, 1010))  # nothing repeats: lookup has nothing

    def auto(masked):
        drafts, source, k, pre = drafter.plan(tokens, masked or None, 100, 1, 1000)
        return len(drafts), k, pre

    forwards = 6000
    rate = {"auto": simulate(auto, forwards, CHAT, cost, 0),
            "one-forward rule": simulate(lambda d: one_forward_rule(d, cost, 8, CHAT), forwards, CHAT, cost, 0)}
    for k in range(2, 9):
        rate[f"linear {k}"] = simulate(lambda d, k=k: (min(len(d), k - 1), k, False), forwards, CHAT, cost, 0)
    assert rate["auto"] > 1.05 * rate["one-forward rule"], rate
    assert rate["auto"] > 1.005 * max(v for name, v in rate.items() if name.startswith("linear")), rate


@pytest.mark.parametrize("block_size", [2, 3, 5, 8])
def test_arrivals_follow_the_eb_rules_kept_drafts(block_size):
    """planning.arrivals against the chain written out by hand (arrivals_of), for a kept estimate a Drafter learned
    from record_kept: the state after a valid block is S_n with n = the drafts the EB rule proposed."""
    from mlx_sbd.planning import arrivals

    d = Drafter("auto", cost=lambda rows, context=0: 1.0, block_size=8, gamma=0.35)
    rng = np.random.default_rng(block_size)
    for _ in range(50):
        d.record_kept(8, int(rng.integers(1, 8)))
    rates = d._rate(d.kept_key)
    kept = [rates.passed[i] / rates.tried[i] for i in range(8)]
    blocks = tuple(range(block_size, 1, -1)) + (0,)
    got = arrivals(blocks, block_size, tuple(np.cumprod([1.0] + kept)))
    for b, k in enumerate(blocks):
        assert got[b] == pytest.approx(arrivals_of(k, kept, block_size), abs=1e-12)
    assert Drafter("auto", cost=lambda rows, context=0: 1.0, block_size=8).kept_key is None  # gamma inf: all kept


def test_pre_drafting_is_priced_by_what_its_forwards_took():
    """The table is measured in the linear layout; pre-drafting forwards that run 1.3x their table price (seen by
    ContextCost.observe, against linear forwards at the table's) make auto price them so: it pre-drafts while they
    seem as cheap as the table says, and stops when they do not, each choice the best one by enumeration."""
    from mlx_sbd.costs import SCALE_MIN, ContextCost

    table = {1: 1.0, 2: 1.02, 4: 1.06, 8: 1.14, 16: 1.3, 32: 1.62}  # rows nearly free: pre-drafting pays at 1x
    cost = ContextCost({256: table})
    prior = [0.8, 0.6, 0.5]
    choices = []
    for scale in (1.0, 1.3):
        d = Drafter("auto", has_adapter=True, cost=cost, block_size=4, sbd_prior=prior, layout="auto")
        assert cost.predraft_scale() == pytest.approx(scale)
        as_rows = lambda rows, context=0: cost(rows, context)  # noqa: E731  (the enumeration's time(rows))
        choices.append(chosen_is_best(d, [7, 8, 9], prior, 4, as_rows, scale=scale))
        for rows in range(SCALE_MIN):  # what the forwards took: linear at the table's price, pre-drafting at 1.3x
            cost.observe(3 + rows, 256, cost(3 + rows, 256))
            cost.observe(6 + rows, 256, 1.3 * cost(6 + rows, 256), predraft=True)
    assert choices[0][2] and not choices[1][2], choices  # pre-drafting, then not


@pytest.mark.parametrize("seed", range(4))
def test_the_tables_choose_what_the_full_grid_chooses(seed):
    """A forward after a forward (one pending token, no bound) picks from per-source tables made at the last solve
    (Planner.table); the same plan over every action of its options (Planner.choose, the path after a prompt or near
    a bound) picks an action of the same value."""
    rng = np.random.default_rng(seed)
    cost = lambda rows, context=0: 1 + rng.uniform(0.02, 0.3) * np.maximum(np.asarray(rows) - 1, 0)  # noqa: E731
    costs_now = cost(np.arange(400))
    table = lambda rows, context=0: costs_now[np.asarray(rows)]  # noqa: E731  (one fixed draw)
    prior = list(rng.uniform(0.2, 0.9, size=4))
    d = Drafter("auto", has_adapter=True, cost=table, block_size=8, sbd_prior=prior, layout="auto")
    tokens = [1, 2, 3, 4, 9, 1, 2, 3]  # lookup proposes 4 9 1 2 3 from a 3-gram match
    drafts, source, k, pre = d.plan(tokens, [7, 8, 9, 10, 11], 100, 1, 1000)
    blocks = tuple(range(8, 1, -1)) + (0,)
    options = [Actions(d._rate("sbd").expected(5), blocks, (False, True)),
               Actions(d._rate(("lookup", 3)).expected(5), blocks, (False, True))]
    seconds = table(np.arange(400))
    n, (m, b, p) = d.planner.choose(options, seconds)
    after = d.planner.arrivals @ d.planner.h
    values = [a.values(d.planner.rho, seconds, d.planner.h, after, d.planner.scale) for a in options]
    mine = values[0 if source == "sbd" else 1][len(drafts), blocks.index(k), int(pre)]
    assert mine == pytest.approx(values[n][m, b, p], abs=1e-12)
