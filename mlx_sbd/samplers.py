"""Which masked positions of a block to reveal in one SBD decode step, and which token values to write.

A selector maps (logprobs [k, V] float32, masked [k] bool) -> reveal [k] bool. Every selector returns a subset
of `masked` with at least one True whenever any position is masked, so a block always makes progress.
Selectors (SBD_METHOD.md §4):
  entropy     EB-Sampler with the entropy proxy (the paper's default), param gamma >= 0
  confidence  EB-Sampler with the error proxy 1 - max prob, param gamma >= 0
  threshold   Fast-dLLM threshold rule, param tau in [0, 1]
  factor      Fast-dLLM factor rule, param f >= 0
`logprobs` are normalised log-probabilities (log_softmax of the untempered logits): entropies and confidences
are measured before any temperature or top-p/top-k filtering.

Everything here builds lazy mx graphs with no host sync (no .item(), no Python branching on array values),
so the decode loop can evaluate one step with a single sync, or mx.compile a selector.
Token values come from mlx_lm's samplers (`make_token_sampler`); the mask token is not a vocabulary row
(MASK_ID = -1 is only an input id), so sampled ids are always in [0, V).
"""

import math
from typing import Callable

import mlx.core as mx
from mlx_lm.sample_utils import make_sampler

from .errors import SBDError

Selector = Callable[[mx.array, mx.array], mx.array]


def entropy(logprobs: mx.array) -> mx.array:
    """Entropy in nats over the last axis of log-probabilities: [..., V] -> [...]."""
    p = mx.exp(logprobs)
    # 0 * log 0 = 0: rows with -inf entries (filtered vocab) must give 0, not NaN.
    plogp = mx.where(p > 0, p * logprobs, 0.0)
    # Rounding can leave a one-hot row at -1e-8; errors must be >= 0 so the EB budget sums stay monotone.
    return mx.maximum(-plogp.sum(axis=-1), 0.0)


def logits_entropy(logits: mx.array) -> mx.array:
    """Entropy in nats over the last axis of logits, in one exp over the vocabulary instead of entropy(log_softmax)'s
    two (MLX's x86 CPU back-end computes exp one element at a time: ~1.6 ms per 49k-token row, BENCHMARKS 7):
    H = log Z - sum(e * d) / Z with d = logits - max, e = exp(d), Z = sum(e)."""
    d = logits.astype(mx.float32)
    d = d - d.max(axis=-1, keepdims=True)
    e = mx.exp(d)
    z = e.sum(axis=-1)
    return mx.maximum(mx.log(z) - mx.where(e > 0, e * d, 0.0).sum(axis=-1) / z, 0.0)


def _confidence(logprobs: mx.array) -> mx.array:
    """Probability of the most likely token: [k, V] -> [k]."""
    return mx.exp(logprobs.max(axis=-1))


def _before(key: mx.array, masked: mx.array) -> mx.array:
    """[k, k] bool: entry (i, j) is True when masked position j sorts before position i by ascending key.

    Ties go to the lower index, so results are deterministic without relying on a stable sort. k is a block
    size (<= a few dozen), so the k x k comparison is cheaper than a sort plus scatter.
    """
    k = key.shape[-1]
    idx = mx.arange(k)
    key_i, key_j = key[:, None], key[None, :]  # [k, 1], [1, k]
    lower_index = idx[None, :] < idx[:, None]  # [k, k]: j < i
    return masked[None, :] & ((key_j < key_i) | ((key_j == key_i) & lower_index))


def budget_reveal(errors: mx.array, masked: mx.array, gamma: float) -> mx.array:
    """The EB-Sampler rule on per-position error proxies: errors [k] >= 0, masked [k] bool -> reveal [k] bool.

    Sort the masked positions by error ascending and reveal the first s, where s >= 1 is the largest integer
    with (sum of the first s-1 sorted errors) <= gamma: the position that crosses the budget is still revealed.
    Equivalently, a masked position is revealed when the errors of the masked positions sorted before it sum
    to <= gamma. Exact ties: positions with error exactly 0 cost nothing, so at gamma = 0 all of them are
    revealed together with the next-lowest one (the definition read literally); equal errors are ordered by
    position, lower index first.
    """
    before = _before(errors, masked)  # [k, k]
    spent = mx.where(before, errors[None, :], 0.0).sum(axis=-1)  # [k]: errors of masked positions sorted before i
    first = ~before.any(axis=-1)  # the lowest-error masked position: always revealed, whatever gamma is
    return masked & ((spent <= gamma) | first)


def eb_entropy(logprobs: mx.array, masked: mx.array, gamma: float) -> mx.array:
    """EB-Sampler, entropy proxy (the paper's default): [k, V], [k] -> reveal [k]."""
    return budget_reveal(entropy(logprobs), masked, gamma)


def eb_confidence(logprobs: mx.array, masked: mx.array, gamma: float) -> mx.array:
    """EB-Sampler, confidence proxy: error = 1 - max prob, same budget rule as eb_entropy."""
    errors = mx.maximum(1.0 - _confidence(logprobs), 0.0)
    return budget_reveal(errors, masked, gamma)


def confidence_threshold(logprobs: mx.array, masked: mx.array, threshold: float) -> mx.array:
    """Fast-dLLM threshold rule: reveal every masked position with max prob >= threshold, and always the most
    confident masked one (ties: lower index). `>=` as in Fast-dLLM's code, which drops a candidate only when its
    confidence is < threshold."""
    conf = _confidence(logprobs)
    first = ~_before(-conf, masked).any(axis=-1)
    return masked & ((conf >= threshold) | first)


def confidence_factor(logprobs: mx.array, masked: mx.array, factor: float) -> mx.array:
    """Fast-dLLM factor rule: sort masked positions by confidence descending (c_(1) >= c_(2) >= ...) and reveal
    the top n, n the largest integer with (n + 1) * (1 - c_(n)) < factor, and n >= 1.

    (n + 1) * (1 - c_(n)) grows with n, so the condition holds on a prefix of the sorted order and can be
    tested per position. Fast-dLLM's reference code also reveals one extra token when only the last candidate
    fails; that quirk is not reproduced here.
    """
    conf = _confidence(logprobs)
    before = _before(-conf, masked)  # [k, k]
    n = before.sum(axis=-1) + 1  # [k]: 1-based rank among masked positions by confidence
    return masked & (((n + 1) * (1.0 - conf) < factor) | (n == 1))


SELECTORS = {
    "entropy": eb_entropy,
    "confidence": eb_confidence,
    "threshold": confidence_threshold,
    "factor": confidence_factor,
}


def make_selector(name: str, param: float) -> Selector:
    """A selector (logprobs [k, V], masked [k]) -> reveal [k] by name, with its parameter checked once here."""
    if name not in SELECTORS:
        raise SBDError(f"unknown sampler '{name}'; choose one of: {', '.join(SELECTORS)}")
    param = float(param)
    if not math.isfinite(param) or param < 0:
        raise SBDError(f"the '{name}' sampler's parameter must be a finite number >= 0, got {param}")
    if name == "threshold" and param > 1:
        raise SBDError(f"the confidence threshold must be in [0, 1], got {param}")
    rule = SELECTORS[name]

    def select(logprobs: mx.array, masked: mx.array) -> mx.array:
        return rule(logprobs, masked, param)

    return select


def make_token_sampler(temp: float = 0.0, top_p: float = 0.0, top_k: int = 0) -> Callable[[mx.array], mx.array]:
    """mlx_lm's sampler (argmax at temp 0) with the arguments checked: logprobs [k, V] -> token ids [k]."""
    import numbers

    def number(x) -> bool:  # numpy scalars count, bools do not
        return isinstance(x, numbers.Real) and not isinstance(x, bool)

    if not (number(temp) and math.isfinite(temp) and temp >= 0):  # NaN would sample garbage, inf never a token
        raise SBDError(f"temperature must be a finite number >= 0, got {temp!r}")
    if not (number(top_p) and 0 <= top_p <= 1):  # NaN fails the comparison too
        raise SBDError(f"top-p must be a number in [0, 1], got {top_p!r}")
    if not isinstance(top_k, numbers.Integral) or isinstance(top_k, bool) or top_k < 0:
        raise SBDError(f"top-k must be an integer >= 0, got {top_k!r}")
    # Python numbers: mlx_lm compiles its samplers, and a numpy scalar in there fails at the first call.
    return make_sampler(temp=float(temp), top_p=float(top_p), top_k=int(top_k))
