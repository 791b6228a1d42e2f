"""Branch rows (drafting.py; masks.branch_spans): a forward may carry, beside the mask block's drafts, the block's
second guess for a draft's position. When the verifier rejects that draft and its token is the branch row's
candidate, the branch row's own causal token is the next forward's first draft.

References: the layout's definition re-derived row by row in plain Python; each branch row against the causal row of
a forward whose draft at that position is the candidate (and the mask block against the linear layout without
branch rows); mlx_lm's generate_step on the base weights for the output; the exact distribution of the first tokens
for sampling; a fresh causal forward for the cache.
"""

import mlx.core as mx
import numpy as np
import pytest
from test_verified import (PROMPTS, chi_square_p, gated, mlx_lm_greedy, ours, run_sampling_test,  # noqa: F401
                           sampling_setup, two_pending)

import mlx_sbd
from mlx_sbd import decode
from mlx_sbd.attention import BlockMask, make_span_mask
from mlx_sbd.drafting import RESCUE_PRIOR, Drafter, Rescues
from mlx_sbd.loading import load_model
from mlx_sbd.masks import branch_spans, span_mask
from mlx_sbd.model import MASK_ID


@pytest.mark.parametrize("offset,pending,m,at,k", [(0, 1, 3, [0, 1], 4), (7, 2, 4, [0, 0, 1, 3], 3), (5, 1, 1, [0], 2),
                                                  (3, 3, 2, [], 4)])
def test_branch_spans_match_definition(offset, pending, m, at, k):
    """Row by row: x and the drafts are causal; a branch row beside draft index i stands at d_(i+1)'s position and
    sees the cache, the pending tokens, d1..di and itself; the mask block sits after dm and sees the cache, the
    pending tokens, every draft and its own k rows, and no branch row."""
    positions, visible, lo, hi = branch_spans(offset, pending, m, at, k)
    T = pending + m + len(at) + k
    S = offset + T
    got = np.array(span_mask(visible, lo, hi, S))
    for t in range(T):
        if t < pending + m:  # causal
            pos, keys = offset + t, set(range(offset + t + 1))
        elif t < pending + m + len(at):  # a branch row
            i = at[t - pending - m]
            pos = offset + pending + i
            keys = set(range(offset + pending + i)) | {offset + t}
        else:  # mask row j
            j = t - pending - m - len(at)
            pos = offset + pending + m + j
            keys = set(range(offset + pending + m)) | set(range(offset + pending + m + len(at), S))
        assert positions[t].item() == pos, t
        assert set(np.flatnonzero(got[t]).tolist()) == keys, t


def test_branch_rows_are_the_causal_rows_of_the_other_candidate(gated):
    """Branch row i's hidden state is the causal row at d_(i+1)'s position in a forward whose draft there is the
    candidate (the same prefix d1..di before it), and the mask block's rows are the linear layout's without branch
    rows: the branch rows change nothing else in the forward. Hidden states compared in float32."""
    _, _, model, _ = gated
    ids, drafts, k = PROMPTS[1], [3, 17, 40, 9], 4
    alts = [(0, 8), (0, 22), (1, 21), (2, 5)]  # (draft index, candidate): two beside d1
    m = len(drafts)

    cache = two_pending(model, ids)
    pending = len(cache.pending)
    inputs = mx.array(cache.pending + drafts + [b for _, b in alts] + [MASK_ID] * k)
    positions, visible, lo, hi = branch_spans(cache.offset, pending, m, [i for i, _ in alts], k)
    mask = make_span_mask(visible, lo, hi, cache.offset + inputs.shape[0], mask_from=pending + m + len(alts))
    h = np.array(model.forward(inputs, positions=positions, mask=mask, cache=cache.layers, return_hidden=True,
                               mask_rows=k))
    for row, (i, b) in enumerate(alts):
        cache = two_pending(model, ids)
        x = mx.array(cache.pending + drafts[:i] + [b])
        causal = np.array(model.forward(x, cache=cache.layers, return_hidden=True))[-1]
        assert np.abs(h[pending + m + row] - causal).max() < 1e-4, row
        assert np.abs(h[pending + m + row] - h[pending + i]).max() > 1e-2  # not the draft's own row: the test can tell
    cache = two_pending(model, ids)
    x = mx.array(cache.pending + drafts + [MASK_ID] * k)
    linear = np.array(model.forward(x, mask=BlockMask(causal_point=pending + m), cache=cache.layers,
                                    return_hidden=True, mask_rows=k))
    assert np.abs(h[: pending + m] - linear[: pending + m]).max() < 1e-4
    assert np.abs(h[-k:] - linear[-k:]).max() < 1e-4


@pytest.mark.parametrize("branch", [1, 3, 7])
@pytest.mark.parametrize("k,gamma", [(4, 1.0), (8, float("inf"))])
def test_greedy_with_branch_rows_equals_mlx_lm(gated, branch, k, gamma):
    """The output stays mlx_lm's on the base with branch rows on every forward that has the block's drafts (this
    random adapter's second guesses rescue nothing: tests/test_verified_smollm2.py checks rescues on the real
    model and adapter)."""
    base, _, model, tokenizer = gated
    for ids in PROMPTS:
        got, last = ours(model, tokenizer, ids, max_tokens=40, block_size=k, gamma=gamma, branch=branch)
        assert got == mlx_lm_greedy(base, ids, 40, tokenizer.eos_token_ids)
        plain, without = ours(model, tokenizer, ids, max_tokens=40, block_size=k, gamma=gamma)
        assert last.rows > without.rows  # branch rows were sent


@pytest.mark.parametrize("branch", [2, 7])
def test_branch_rows_leave_the_cache_exact_and_cut_exactly(gated, branch):
    """After decoding with branch rows the cache equals a fresh causal forward over the conversation (no branch row's
    K/V stays behind), and every max_tokens cut is the reference's."""
    base, _, model, tokenizer = gated
    cache = mlx_sbd.make_prompt_cache(model)
    got, last = ours(model, tokenizer, PROMPTS[1], max_tokens=25, block_size=8, gamma=float("inf"), prompt_cache=cache,
                     branch=branch)
    decode.prefill(model, cache, [])
    fresh = load_model(base).make_cache()
    load_model(base)(mx.array(cache.tokens)[None], cache=fresh)
    n = len(cache.tokens)
    assert cache.offset == n and cache.tokens == PROMPTS[1] + got
    for a, b in zip(cache.layers, fresh):
        assert np.abs(np.array(a.keys[..., :n, :]) - np.array(b.keys[..., :n, :])).max() <= 1e-4
    ref = mlx_lm_greedy(base, PROMPTS[0], 30)
    for n in range(1, 14):
        assert ours(model, tokenizer, PROMPTS[0], max_tokens=n, block_size=8, gamma=float("inf"),
                    branch=branch)[0] == ref[:n]


@pytest.fixture(scope="module")
def rescuing(tmp_path_factory):
    """A 1-layer model over 3 letters with a weak random gated adapter whose second guesses are often the sampled
    token (~0.3 rescues per draw of 4 tokens, where test_verified's small_vocab has ~0.01)."""
    from mlx_sbd.tiny import make_tiny_model

    base = make_tiny_model(tmp_path_factory.mktemp("rescuing") / "base", hidden_size=32, num_hidden_layers=1,
                           intermediate_size=64, num_attention_heads=2, num_key_value_heads=1, alphabet="abc", seed=0)
    return sampling_setup(base, 0.05)


@pytest.mark.parametrize("draws", [pytest.param(20000, marks=pytest.mark.slow), 3000])
def test_sampling_with_branch_rows_keeps_the_distribution(rescuing, draws):
    """Draws of the first 3 tokens with branch rows on every forward against the exact distribution of the base;
    rescues happen (a branch row's draft is drawn from its own distribution, which is its q). The 20k draws are
    shared between two processes."""
    rescued = []
    p, chi2 = run_sampling_test(rescuing, draws, branch=3, workers=2 if draws > 3000 else 1, rescued=rescued)
    assert sum(rescued) > draws / 10
    assert p > 1e-3, f"chi2 {chi2:.1f}, p {p:.2g}"


def test_auto_sends_branch_rows_when_rows_are_cheap_and_none_when_dear():
    """auto's branch rows: the likeliest first, while a row's chance to rescue (one token each) beats its time at the
    generation's rate; a fixed count takes the likeliest."""
    candidates = [[10, 11, 12], [20, 21, 22], [30, 31, 32]]  # next-best guesses at draft positions 0, 1, 2
    free = Drafter("auto", has_adapter=True, cost=lambda rows, context=0: np.ones_like(np.asarray(rows), float),
                   block_size=8, branch="auto")
    free.plan([1, 2, 3], [5, 6, 7], 10, 1, 100)  # solves: rho
    assert len(free.alternatives(candidates, 1 + 3 + 8)) == 9
    # each row costs a tenth of a one-row forward: worth it only where the chance to rescue beats ~rho * 0.1
    steep = Drafter("auto", has_adapter=True, cost=lambda rows, context=0: 1.0 + 0.1 * np.asarray(rows, float),
                    block_size=8, branch="auto")
    steep.plan([1, 2, 3], [5, 6, 7], 10, 1, 100)
    worth = sorted(((RESCUE_PRIOR[r][j], j, r) for j in range(3) for r in range(3)
                    if RESCUE_PRIOR[r][j] > steep.planner.rho * 0.1), reverse=True)
    assert 0 < len(worth) < 9  # the prices make the test tell "some" from "all" and "none"
    assert steep.alternatives(candidates, 12) == sorted((j, r, candidates[j][r]) for _, j, r in worth)
    assert Drafter("sbd", block_size=8).alternatives(candidates, 12) == []  # fixed modes: none unless asked
    assert Drafter("sbd", block_size=8, branch="auto").alternatives(candidates, 12) == []  # no prices to choose by
    best = max((RESCUE_PRIOR[r][j], j, r) for j in range(3) for r in range(3))
    assert Drafter("sbd", block_size=8, branch=1).alternatives(candidates, 12) == [(best[1], best[2],
                                                                                     candidates[best[1]][best[2]])]
    assert len(Drafter("sbd", block_size=8, branch=20).alternatives(candidates, 12)) == 9


def test_rescue_estimates_follow_what_happens():
    r = Rescues(prior=((0.5, 0.5), (0.25,)))
    for _ in range(200):
        r.record([(0, 0), (1, 0), (0, 1)], 0)  # the row at (0, 0) always rescues, the others never
    assert r.rate(0, 0) > 0.9 and r.rate(1, 0) < 0.1 and r.rate(0, 1) < 0.1
    assert r.rate(5, 0) == pytest.approx(0.5) and r.rate(5, 3) == pytest.approx(0.25)


def test_branch_must_be_a_count_or_auto_and_defaults_to_none_on_the_cpu(monkeypatch):
    from mlx_sbd import drafting
    from mlx_sbd.drafting import parse_branch, resolve_branch
    from mlx_sbd.errors import SBDError

    for bad in (-1, 1.5, True, "x", "-2"):
        with pytest.raises(SBDError):
            Drafter("sbd", block_size=8, branch=bad)
        with pytest.raises(SBDError):
            parse_branch(bad)
    assert parse_branch("3") == 3 and parse_branch("auto") == "auto" and parse_branch(None) is None
    assert resolve_branch(None, "auto") == 0 and resolve_branch("auto", "auto") is None  # this CPU: none by default
    assert resolve_branch("auto", "sbd") == 0 and resolve_branch(2, "sbd") == 2
    monkeypatch.setattr(drafting.mx, "default_device", lambda: mx.gpu)  # where rows are cheap: auto's choice
    assert resolve_branch(None, "auto") is None and resolve_branch(None, "sbd") == 0


def test_a_branch_rows_sampled_draft_is_drawn_from_the_base_at_that_position(rescuing):
    """Sampling: a branch row's draft y and its q are the base's next-token distribution after the candidate (a
    fresh causal forward over the prompt and the candidate, filtered the same way): q matches it numerically, and
    2000 draws of y (one forward each, a new seed each) pass a chi-square test against it. With y ~ q and q passed
    as the draft's distribution, the next forward's rule keeps the output's distribution (Leviathan et al.)."""
    model = rescuing.model
    ids, drafts, alts, k, draws = [4, 5, 6], [3, 4], [(0, 5), (0, 6), (1, 6)], 3, 2000
    lm = model.lm
    expected = [np.array(decode.filtered_probs(lm(mx.array([ids + drafts[:i] + [b]]))[0, -1:], 1.0, 0.9, 0))[0]
                for i, b in alts]
    counts = [np.zeros(model.args.vocab_size) for _ in alts]
    for seed in range(draws):
        mx.random.seed(seed)
        cache = mlx_sbd.make_prompt_cache(model)
        decode.prefill(model, cache, ids, keep=1)
        inputs = mx.array(cache.pending + drafts + [b for _, b in alts] + [MASK_ID] * k)
        q = mx.full((len(drafts), model.args.vocab_size), 1.0 / model.args.vocab_size)
        *_, e, _, (y, q_y, others) = decode.verify_step(model, cache, inputs, len(drafts), k, q, gamma=float("inf"),
                                                        temp=1.0, top_p=0.9, top_k=0, alts=[i for i, _ in alts],
                                                        want_alts=2)
        if seed == 0:
            for i in range(len(alts)):
                assert np.abs(np.array(q_y[i]) - expected[i]).max() < 1e-5
            assert others.shape == (k - 1, 2)
        for i, t in enumerate(y.tolist()):
            counts[i][t] += 1
    for i in range(len(alts)):
        keep = expected[i] > 0
        assert counts[i][~keep].sum() == 0  # top-p's cut tokens are never drawn
        p, chi2 = chi_square_p({(t,): c for t, c in enumerate(counts[i]) if c},
                               {(t,): float(pr) for t, pr in enumerate(expected[i]) if pr > 0}, draws)
        assert p > 1e-3, (i, chi2, p)


def test_auto_prices_branch_forwards_by_what_they_took():
    """Forwards with branch rows are priced by their measured ratio to the table (their per-row positions and span
    mask cost more than the linear forwards the table measured) and left out of the table's own check: when they
    take 1.5x the table, auto sends none even where rows are otherwise free."""
    from mlx_sbd.costs import SCALE_MIN, ContextCost

    cost = ContextCost({256: {1: 1.0, 64: 1.0}})  # rows free
    assert cost.layout_scale("branch") == 1.0  # unseen: the table
    for _ in range(SCALE_MIN):
        cost.observe(8, 256, 1.0)
        cost.observe(10, 256, 1.5, branch=True)
    assert cost.layout_scale("branch") == pytest.approx(1.5) and cost.predraft_scale() == 1.0
    assert not cost.remeasured and not cost.rescaled
    d = Drafter("auto", has_adapter=True, cost=cost, block_size=8, branch="auto")
    d.plan([1, 2, 3], [5, 6, 7], 10, 1, 100)
    candidates = [[10, 11, 12], [20, 21, 22], [30, 31, 32]]
    assert d.alternatives(candidates, 12) == []
    cheap = ContextCost({256: {1: 1.0, 64: 1.0}})
    free = Drafter("auto", has_adapter=True, cost=cheap, block_size=8, branch="auto")
    free.plan([1, 2, 3], [5, 6, 7], 10, 1, 100)
    assert len(free.alternatives(candidates, 12)) == 9


def test_auto_tries_a_declined_branch_row_now_and_then():
    """An estimate moves only when its row is sent: one forward in EXPLORE that declined rows sends one of them, the
    one passed over longest (the likeliest first), and its rescues bring it back."""
    from mlx_sbd.drafting import EXPLORE

    d = Drafter("auto", has_adapter=True, cost=lambda rows, context=0: 1.0 + 10.0 * np.asarray(rows, float),
                block_size=8, branch="auto")  # rows far too dear
    d.plan([1, 2, 3], [5, 6, 7], 10, 1, 100)
    candidates = [[10, 11], [20, 21]]
    sent = []
    for _ in range(4 * EXPLORE):  # as the decode loop does: each forward's rows recorded (none rescued)
        sent.append(d.alternatives(candidates, 12))
        d.record_alternatives([(j, r) for j, r, _ in sent[-1]], None)
    ranked = [(j, r) for _, j, r in sorted(((RESCUE_PRIOR[r][j], j, r) for j in range(2) for r in range(2)),
                                           reverse=True)]
    explored = [(i, x[0][:2]) for i, x in enumerate(sent) if x]
    assert explored == [(EXPLORE * (n + 1) - 1, jr) for n, jr in enumerate(ranked)]  # each once, likeliest first
    before = d.rescues.rate(*ranked[0])
    d.record_alternatives([ranked[0]], 0)  # it rescued
    assert d.rescues.rate(*ranked[0]) > before
