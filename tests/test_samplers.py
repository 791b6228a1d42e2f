"""Samplers against SBD_METHOD.md §4's worked examples and an independent brute-force numpy re-derivation."""

import math

import mlx.core as mx
import numpy as np
import pytest

from mlx_sbd.errors import SBDError
from mlx_sbd.samplers import (
    SELECTORS,
    budget_reveal,
    confidence_factor,
    confidence_threshold,
    eb_confidence,
    eb_entropy,
    entropy,
    make_selector,
    make_token_sampler,
)

TRIALS = 300
NEAR = 1e-4  # float32 vs float64 margin: random cases this close to a decision boundary are redrawn


# ---- independent numpy reference -------------------------------------------------------------------------

def np_logprobs(logits):
    z = logits.astype(np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def np_entropy(logprobs):
    lp = logprobs.astype(np.float64)
    p = np.exp(lp)
    return -np.sum(np.where(p > 0, p * np.where(p > 0, lp, 0.0), 0.0), axis=-1)


def brute_eb(errors, masked, gamma):
    """Largest s >= 1 with sum of the first s-1 sorted errors <= gamma, found by trying s = m, m-1, ..., 1."""
    order = sorted(np.flatnonzero(masked), key=lambda i: (errors[i], i))
    for s in range(len(order), 0, -1):
        if sum(errors[i] for i in order[: s - 1]) <= gamma:
            return set(order[:s])
    return set()


def brute_factor(conf, masked, f):
    """Top n by confidence, n = max({1} U {n : (n + 1) * (1 - c_(n)) < f}) (read literally, no prefix shortcut)."""
    order = sorted(np.flatnonzero(masked), key=lambda i: (-conf[i], i))
    if not order:
        return set()
    ok = [n for n in range(1, len(order) + 1) if (n + 1) * (1 - conf[order[n - 1]]) < f]
    return set(order[: max([1] + ok)])


def brute_threshold(conf, masked, tau):
    idx = np.flatnonzero(masked)
    if len(idx) == 0:
        return set()
    best = min(idx, key=lambda i: (-conf[i], i))
    return {i for i in idx if conf[i] >= tau} | {best}


def revealed(reveal):
    return set(np.flatnonzero(np.array(reveal)).tolist())


def random_case(rng):
    k = int(rng.integers(1, 17))
    v = int(rng.integers(2, 40))
    logits = rng.normal(size=(k, v)) * rng.uniform(0.3, 8.0)
    masked = rng.random(k) < rng.uniform(0.2, 1.0)
    lp32 = np_logprobs(logits).astype(np.float32)
    return lp32, masked


def binary_logprobs(h):
    """A [2] log-prob row whose binary entropy is h nats (bisection on p in (0, 1/2])."""
    lo, hi = 1e-12, 0.5
    for _ in range(200):
        mid = (lo + hi) / 2
        hm = -(mid * math.log(mid) + (1 - mid) * math.log(1 - mid))
        lo, hi = (mid, hi) if hm < h else (lo, mid)
    return [math.log(1 - lo), math.log(lo)]


# ---- entropy -----------------------------------------------------------------------------------------------

def test_entropy_matches_numpy_formula():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(64, 50)) * rng.uniform(0.1, 10, size=(64, 1))
    lp = np_logprobs(logits).astype(np.float32)
    np.testing.assert_allclose(np.array(entropy(mx.array(lp))), np_entropy(lp), atol=2e-5, rtol=1e-4)


def test_entropy_of_uniform_and_filtered_rows():
    lp = mx.array([[math.log(0.25)] * 4, [0.0, -math.inf, -math.inf, -math.inf],
                   [math.log(0.5), math.log(0.5), -math.inf, -math.inf]])
    np.testing.assert_allclose(np.array(entropy(lp)), [math.log(4), 0.0, math.log(2)], atol=1e-6)


# ---- EB rule: worked examples ---------------------------------------------------------------------------

@pytest.mark.parametrize("h, expected", [([0.01, 0.02, 0.5], {0, 1, 2}), ([0.3, 0.5, 0.01], {0, 2})])
def test_worked_examples(h, expected):
    masked = mx.array([True, True, True])
    assert revealed(budget_reveal(mx.array(h), masked, 0.1)) == expected
    # The same through eb_entropy, with 2-token distributions built to have exactly these entropies.
    lp = np.array([binary_logprobs(x) for x in h], dtype=np.float32)
    np.testing.assert_allclose(np_entropy(lp), h, atol=1e-5)
    assert revealed(eb_entropy(mx.array(lp), masked, 0.1)) == expected


def test_budget_crossing_token_is_included_and_one_is_always_revealed():
    masked = mx.array([True] * 4)
    # 0.2 alone is over gamma=0.1 but is the first: revealed. The second costs 0.2 > 0.1 of budget already spent.
    assert revealed(budget_reveal(mx.array([0.2, 0.3, 0.4, 0.5]), masked, 0.1)) == {0}
    # Sum before the 3rd is exactly gamma (dyadic, exact in float32): s - 1 = 2 counts, so 3 revealed.
    assert revealed(budget_reveal(mx.array([0.25, 0.125, 0.5, 0.75]), masked, 0.375)) == {0, 1, 2}
    # The progress guarantee does not depend on the caller validating gamma.
    assert revealed(budget_reveal(mx.array([0.2, 0.1, 0.4, 0.5]), masked, -1.0)) == {1}


def test_gamma_zero_reveals_exactly_one_per_call():
    rng = np.random.default_rng(1)
    for _ in range(TRIALS):
        lp, masked = random_case(rng)
        if not masked.any():
            continue
        h = np_entropy(lp)
        reveal = np.array(eb_entropy(mx.array(lp), mx.array(masked), 0.0))
        assert reveal.sum() == 1
        i = int(np.flatnonzero(reveal)[0])
        assert masked[i] and h[i] <= h[masked].min() + 1e-5


def test_gamma_zero_with_exact_zero_entropy_ties():
    # Documented behaviour: zero-entropy positions cost nothing, so all of them plus the next-lowest are revealed.
    one_hot = [0.0, -math.inf, -math.inf]
    lp = mx.array([one_hot, [math.log(0.5), math.log(0.5), -math.inf], one_hot, [math.log(1 / 3)] * 3])
    masked = mx.array([True, True, True, True])
    assert revealed(eb_entropy(lp, masked, 0.0)) == {0, 1, 2}
    assert revealed(budget_reveal(mx.array([0.0, 0.0, 0.5, 0.7]), masked, 0.0)) == {0, 1, 2}


# ---- EB rule: randomized against brute force -------------------------------------------------------------

def test_budget_rule_with_exact_ties_matches_brute_force():
    """Errors on a 1/8 grid (many equal values, zeros) and gammas equal to exact prefix sums: all exact in float32."""
    rng = np.random.default_rng(2)
    for _ in range(TRIALS):
        k = int(rng.integers(1, 17))
        errors = rng.integers(0, 6, size=k) / 8.0
        masked = rng.random(k) < 0.7
        sums = np.cumsum(np.sort(errors[masked])) if masked.any() else np.array([0.0])
        gamma = float(rng.choice([0.0, float(rng.choice(sums)), rng.integers(0, 20) / 8.0]))
        got = revealed(budget_reveal(mx.array(errors.astype(np.float32)), mx.array(masked), gamma))
        assert got == brute_eb(errors, masked, gamma), (errors, masked, gamma)


def _away_from_boundaries(errors, masked, draw):
    sums = np.concatenate([[0.0], np.cumsum(np.sort(errors[masked]))])
    while True:
        x = draw()
        if np.all(np.abs(sums - x) > NEAR):
            return x


@pytest.mark.parametrize("rule, errors_of", [
    (eb_entropy, np_entropy),
    (eb_confidence, lambda lp: 1.0 - np.exp(lp.astype(np.float64)).max(axis=-1)),
])
def test_eb_selectors_match_brute_force(rule, errors_of):
    rng = np.random.default_rng(3)
    for _ in range(TRIALS):
        lp, masked = random_case(rng)
        errors = errors_of(lp)
        gamma = _away_from_boundaries(errors, masked, lambda: float(rng.choice([0.0, rng.exponential(0.8)])))
        got = revealed(rule(mx.array(lp), mx.array(masked), gamma))
        assert got == brute_eb(errors, masked, gamma), (errors, masked, gamma)


# ---- Fast-dLLM rules -------------------------------------------------------------------------------------

def test_threshold_matches_brute_force():
    rng = np.random.default_rng(4)
    for _ in range(TRIALS):
        lp, masked = random_case(rng)
        conf = np.exp(lp.astype(np.float64)).max(axis=-1)
        tau = rng.uniform(0, 1)
        while np.any(np.abs(conf - tau) < NEAR):
            tau = rng.uniform(0, 1)
        got = revealed(confidence_threshold(mx.array(lp), mx.array(masked), tau))
        assert got == brute_threshold(conf, masked, tau)


def test_factor_matches_brute_force():
    rng = np.random.default_rng(5)
    for _ in range(TRIALS):
        lp, masked = random_case(rng)
        conf = np.exp(lp.astype(np.float64)).max(axis=-1)
        order = sorted(np.flatnonzero(masked), key=lambda i: (-conf[i], i))
        scores = np.array([(n + 1) * (1 - conf[i]) for n, i in enumerate(order, start=1)])
        f = rng.uniform(0, 3)
        while np.any(np.abs(scores - f) < NEAR):
            f = rng.uniform(0, 3)
        got = revealed(confidence_factor(mx.array(lp), mx.array(masked), f))
        assert got == brute_factor(conf, masked, f)


def test_threshold_and_factor_worked_examples():
    lp = mx.array(np.log(np.array([[0.95, 0.05], [0.6, 0.4], [0.99, 0.01], [0.7, 0.3]], dtype=np.float32)))
    masked = mx.array([True, True, True, True])
    assert revealed(confidence_threshold(lp, masked, 0.9)) == {0, 2}
    assert revealed(confidence_threshold(lp, masked, 0.995)) == {2}  # none passes: the most confident anyway
    # sorted c = .99, .95, .7, .6; (n+1)(1-c) = .02, .15, 1.2, 2.0
    assert revealed(confidence_factor(lp, masked, 1.0)) == {2, 0}
    assert revealed(confidence_factor(lp, masked, 0.01)) == {2}
    assert revealed(confidence_factor(lp, masked, 1.5)) == {2, 0, 3}


# ---- properties shared by all selectors ------------------------------------------------------------------

@pytest.mark.parametrize("name", list(SELECTORS))
def test_subset_of_masked_and_at_least_one(name):
    rng = np.random.default_rng(6)
    for _ in range(TRIALS // 3):
        lp, masked = random_case(rng)
        param = float(rng.choice([0.0, 0.05, 0.3, 0.9, 1.0]))
        reveal = np.array(make_selector(name, param)(mx.array(lp), mx.array(masked)))
        assert reveal.dtype == np.bool_ and reveal.shape == masked.shape
        assert not (reveal & ~masked).any()
        assert reveal.any() == masked.any()


@pytest.mark.parametrize("name", list(SELECTORS))
def test_selectors_compile_without_host_sync(name):
    # mx.compile rejects graphs that need a value on the host, so this also checks "no .item() inside".
    rng = np.random.default_rng(7)
    lp, masked = random_case(rng)
    masked[0] = True
    select = make_selector(name, 0.4)
    compiled = mx.compile(select)
    assert np.array_equal(np.array(compiled(mx.array(lp), mx.array(masked))),
                          np.array(select(mx.array(lp), mx.array(masked))))


def test_make_selector_errors():
    with pytest.raises(SBDError) as err:
        make_selector("bogus", 0.1)
    assert all(name in str(err.value) for name in SELECTORS)
    for name in ("entropy", "confidence", "threshold", "factor"):
        with pytest.raises(SBDError):
            make_selector(name, -0.1)
    with pytest.raises(SBDError):
        make_selector("entropy", float("nan"))
    with pytest.raises(SBDError):
        make_selector("threshold", 1.5)


# ---- token values ----------------------------------------------------------------------------------------

def test_token_sampler_greedy_and_in_vocab():
    rng = np.random.default_rng(8)
    logits = rng.normal(size=(16, 100)) * 3
    lp = mx.array(np_logprobs(logits).astype(np.float32))
    for sampler in (make_token_sampler(), make_token_sampler(1.0, top_k=1), make_token_sampler(0.7, top_p=1e-6)):
        ids = np.array(sampler(lp))
        assert ids.shape == (16,)
        assert np.array_equal(ids, logits.argmax(axis=-1))
    mx.random.seed(0)
    ids = np.array(make_token_sampler(1.5, top_p=0.9, top_k=20)(lp)).astype(np.int64)
    assert ids.shape == (16,) and ids.min() >= 0 and ids.max() < 100


def test_token_sampler_bad_arguments():
    for kw in ({"temp": -1.0}, {"top_p": 1.5}, {"top_k": -2}):
        with pytest.raises(SBDError):
            make_token_sampler(**kw)


def test_logits_entropy_is_the_entropy_of_the_softmax():
    """The one-exp entropy the verified loop's draft length uses, against numpy's softmax entropy, from peaked to
    flat rows, with masked (-inf) entries and at a large vocabulary."""
    from mlx_sbd.samplers import logits_entropy

    rng = np.random.default_rng(5)
    for scale, vocab in ((0.01, 7), (1.0, 50), (10.0, 50), (100.0, 50), (3.0, 49152)):
        logits = (rng.normal(size=(4, vocab)) * scale).astype(np.float32)
        logits[0, : vocab // 2] = -np.inf
        lp = logits - np.log(np.exp(logits.astype(np.float64) - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(-1, keepdims=True)
        want = np_entropy(lp)
        got = np.array(logits_entropy(mx.array(logits)))
        assert np.allclose(got, want, atol=2e-4 * max(1.0, np.log(vocab))), (scale, vocab, got, want)
