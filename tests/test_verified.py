"""Verified (lossless) decoding on tiny models: gated adapters leave the causal path the base model, and verified
decoding's output is the causal path's own.

References: mlx_lm's generate_step on the *base* weights loaded by mlx_lm itself (greedy identity), a fresh causal
forward (cache exactness), the exact distribution of the first tokens enumerated by causal forwards (sampling).
A gated adapter with random LoRA weights must pass: it drafts badly, which exercises rejection on every forward.
"""

import functools
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass

import mlx.core as mx
import mlx_lm
import numpy as np
import pytest
from mlx.utils import tree_flatten
from mlx_lm.generate import generate_step

import mlx_sbd
from mlx_sbd import decode
from mlx_sbd.adapter import base_layers, load_adapter, make_trainable, save_adapter
from mlx_sbd.attention import BlockMask
from mlx_sbd.errors import SBDError
from mlx_sbd.loading import load_model
from mlx_sbd.model import MASK_ID, SBDSettings
from mlx_sbd.tiny import make_tiny_model

PROMPTS = [[10, 20, 30, 11, 21], [5, 6, 7, 8, 9, 10, 11, 12, 13], [40], [33, 34, 33, 34, 33, 34, 33]]
LORA = {"rank": 4, "scale": 10.0, "dropout": 0.0}


def randomize_lora(model, seed=0, std=0.3, mask=True):
    """LoRA B starts at zero (a no-op): give every LoRA leaf random values so the adapter really changes rows
    (and the mask embedding too, with `mask`)."""
    mx.random.seed(seed)
    leaves = [(k, mx.random.normal(v.shape) * std) for k, v in tree_flatten(model.lm.trainable_parameters())
              if k.endswith(("lora_a", "lora_b"))]
    model.lm.load_weights(leaves, strict=False)
    if mask:
        model.mask_embedding = mx.random.normal(model.mask_embedding.shape)


@pytest.fixture(scope="module")
def gated(tmp_path_factory):
    """(base folder, gated adapter folder, model with the adapter, tokenizer)."""
    root = tmp_path_factory.mktemp("verified")
    base = make_tiny_model(root / "base", hidden_size=64, num_hidden_layers=2, intermediate_size=128, seed=3)
    model = load_model(base)
    # Sharpen the random base so that greedy continuations are not all ties (near-uniform logits).
    make_trainable(model, "lora", -1, LORA, gated=True)
    randomize_lora(model)
    save_adapter(model, root / "adapter", {"fine_tune_type": "lora", "gated": True, "num_layers": 2,
                                           "lora_parameters": LORA, "sbd": SBDSettings(8, 4, 1.0).to_dict()})
    model, tokenizer = mlx_sbd.load(base, adapter_path=root / "adapter")
    return base, root / "adapter", model, tokenizer


@functools.lru_cache(maxsize=4)
def mlx_lm_model(base: str):
    return mlx_lm.load(base)[0]


def mlx_lm_greedy(base, ids, n, eos=()):
    """mlx_lm on the base weights, loaded by mlx_lm itself: the reference for anything called lossless."""
    lm = mlx_lm_model(str(base))
    out = []
    for tok, _ in generate_step(mx.array(ids), lm, max_tokens=n):
        if tok in eos:
            break
        out.append(tok)
    return out


def ours(model, tokenizer, ids, **kw):
    if kw.get("block_size") != 1:
        kw.setdefault("draft", "sbd")  # the mask block's drafts on every forward (auto might choose none on a CPU)
    out, last = [], None
    for last in mlx_sbd.stream_generate(model, tokenizer, ids, **kw):
        out += last.tokens
    return out, last


def test_gated_adapter_is_gated_and_changes_only_mask_rows(gated):
    base, _, model, _ = gated
    plain = load_model(base)
    ids = mx.array([PROMPTS[1]])
    assert np.array_equal(np.array(model(ids)), np.array(plain(ids)))  # plain call: the base model exactly
    full = model.forward(ids, mask_rows=4)
    ref = plain.forward(ids)
    # The causal rows before the mask rows see only base K/V and base weights; the mask rows differ.
    assert np.abs(np.array(full[0, :-4]) - np.array(ref[0, :-4])).max() <= 1e-5
    assert np.abs(np.array(full[0, -4:]) - np.array(ref[0, -4:])).max() > 1e-2
    assert '"gated": true' in (gated[1] / "adapter_config.json").read_text()


def test_base_layers_is_the_base_as_mlx_lm_loads_it_and_gives_the_gated_layers_back(gated):
    """Within base_layers the model's modules are the base's (no gated layer: a mask-row forward is the base's too,
    as mlx_lm's model would be; the same weight arrays), after it the gated layers are back, also after an error."""
    base, _, model, _ = gated
    plain = load_model(base)
    ids = mx.array([PROMPTS[1]])
    kinds = lambda lm: sorted({type(m).__name__ for _, m in lm.named_modules()})  # noqa: E731
    before = kinds(model.lm)
    assert "GatedLoRALinear" in before
    with base_layers(model) as lm:
        assert lm is model.lm and kinds(lm) == kinds(plain.lm)
        assert np.abs(np.array(model.forward(ids, mask_rows=4)) - np.array(plain.forward(ids))).max() <= 1e-5
        assert np.array_equal(np.array(mlx_lm_model(str(base))(ids)), np.array(lm(ids)))
    assert kinds(model.lm) == before
    assert np.abs(np.array(model.forward(ids, mask_rows=4)[0, -4:]) - np.array(plain.forward(ids)[0, -4:])).max() > 1e-2
    with pytest.raises(RuntimeError):
        with base_layers(model):
            raise RuntimeError("a failing baseline")
    assert kinds(model.lm) == before


def test_one_sequence_form_is_the_batched_forward_and_gated(gated):
    """forward(tokens [T]) (the decode step's form: [T, hidden] throughout, the gated input shared by the projections
    that read it) gives forward(tokens[None])[0] over a cache with a BlockMask, and its causal rows are the base's."""
    base, _, model, _ = gated
    plain = load_model(base)
    tokens = mx.array([3, 9, 4, 1, 7, MASK_ID, MASK_ID, MASK_ID], mx.int32)
    outs = {}
    for name, m, x in [("1d", model, tokens), ("2d", model, tokens[None]), ("base", plain, tokens)]:
        cache = m.make_cache()
        m.lm(mx.array([[5, 6, 2, 8]]), cache=cache)
        out = m.forward(x, mask=BlockMask(causal_point=5), cache=cache, mask_rows=3)
        outs[name] = np.array(out[0] if x.ndim == 2 else out)
    assert outs["1d"].shape == (8, model.args.vocab_size)
    np.testing.assert_allclose(outs["1d"], outs["2d"], atol=1e-5)
    assert np.abs(outs["1d"][:5] - outs["base"][:5]).max() <= 1e-5  # causal rows: the base model
    assert np.abs(outs["1d"][5:] - outs["base"][5:]).max() > 1e-2  # mask rows: the adapter
    # The mask rows again with no causal row in the forward (every row gated: no row selection at all), over a cache
    # that holds the causal rows' base K/V: what they see in the step.
    cache = model.make_cache()
    model.lm(mx.array([[5, 6, 2, 8, 3, 9, 4, 1, 7]]), cache=cache)
    alone = model.forward(mx.array([MASK_ID] * 3, mx.int32), mask=None, cache=cache, mask_rows=3)
    np.testing.assert_allclose(outs["1d"][5:], np.array(alone), atol=1e-5)


@pytest.mark.parametrize("layout", ["linear", "predraft"])
@pytest.mark.parametrize("k,gamma", [(2, 0.0), (4, 1.0), (8, float("inf")), (16, 3.0)])
def test_greedy_equals_mlx_lm_on_the_base(gated, k, gamma, layout):
    base, _, model, tokenizer = gated
    for ids in PROMPTS:
        got, last = ours(model, tokenizer, ids, max_tokens=40, block_size=k, gamma=gamma, layout=layout)
        assert got == mlx_lm_greedy(base, ids, 40, tokenizer.eos_token_ids)
        assert last.drafted > 0


def spy_on_windows(monkeypatch, window):
    """Set the mask rows' window and count the forwards that ran windowed attention."""
    from mlx_sbd import attention

    calls, real = [], attention.windowed_attention
    monkeypatch.setattr(attention, "DRAFT_WINDOW", window)
    monkeypatch.setattr(attention, "windowed_attention", lambda *a: calls.append(1) or real(*a))
    return calls


@pytest.mark.parametrize("layout", ["linear", "predraft"])
def test_mask_rows_window_keeps_the_output(gated, layout, monkeypatch):
    """Mask rows that see only the last few cached keys (attention.DRAFT_WINDOW, here 3) change the drafts, never
    the output: the causal rows still see every key."""
    base, _, model, tokenizer = gated
    calls = spy_on_windows(monkeypatch, 3)
    for ids in PROMPTS:
        got, last = ours(model, tokenizer, ids, max_tokens=40, block_size=4, gamma=1.0, layout=layout)
        assert got == mlx_lm_greedy(base, ids, 40, tokenizer.eos_token_ids)
        assert last.drafted > 0
    assert len(calls) > 100  # the window was in force (every layer of most forwards)


@pytest.mark.parametrize("layout", ["linear", "predraft"])
def test_every_max_tokens_and_eos_cut_is_exact(gated, layout):
    """max_tokens anywhere (inside a block of drafts too) and EOS: output is the reference cut there."""
    base, _, model, tokenizer = gated
    ids = PROMPTS[0]
    ref = mlx_lm_greedy(base, ids, 30)
    for n in range(1, 14):
        assert ours(model, tokenizer, ids, max_tokens=n, block_size=8, gamma=float("inf"), layout=layout)[0] == ref[:n]
    eos = ref[6]
    tokenizer_eos = tokenizer.eos_token_ids
    try:
        tokenizer.eos_token_ids = {eos}
        got, last = ours(model, tokenizer, ids, max_tokens=30, block_size=8, gamma=float("inf"), layout=layout)
    finally:
        tokenizer.eos_token_ids = tokenizer_eos
    assert got == ref[: ref.index(eos)] and last.finish_reason == "stop"


@pytest.mark.parametrize("layout", ["linear", "predraft"])
def test_cache_holds_exactly_the_conversation(gated, layout):
    """After verified decoding the cache equals a fresh causal forward over the conversation (prompt + output):
    no K/V of a rejected draft or a mask row stays behind."""
    base, _, model, tokenizer = gated
    cache = mlx_sbd.make_prompt_cache(model)
    got, last = ours(model, tokenizer, PROMPTS[1], max_tokens=25, block_size=8, gamma=float("inf"), prompt_cache=cache,
                     layout=layout)
    assert last.drafted > last.accepted  # rejections happened
    assert cache.tokens == PROMPTS[1] + got
    decode.prefill(model, cache, [])  # commit the pending tail, as the next turn would
    fresh = load_model(base).make_cache()
    load_model(base)(mx.array(cache.tokens)[None], cache=fresh)
    n = len(cache.tokens)
    assert cache.offset == n
    for a, b in zip(cache.layers, fresh):
        assert np.abs(np.array(a.keys[..., :n, :]) - np.array(b.keys[..., :n, :])).max() <= 1e-4


def test_multi_turn_equals_mlx_lm_on_the_whole_conversation(gated):
    base, _, model, tokenizer = gated
    cache = mlx_sbd.make_prompt_cache(model)
    ours(model, tokenizer, PROMPTS[0], max_tokens=9, block_size=4, gamma=2.0, prompt_cache=cache)
    history = list(cache.tokens)
    second, _ = ours(model, tokenizer, [40, 41, 42], max_tokens=20, block_size=4, gamma=2.0, prompt_cache=cache)
    assert second == mlx_lm_greedy(base, history + [40, 41, 42], 20, tokenizer.eos_token_ids)


def test_trim_to_reuses_a_shared_prefix(gated):
    base, _, model, tokenizer = gated
    cache = mlx_sbd.make_prompt_cache(model)
    ours(model, tokenizer, PROMPTS[1], max_tokens=10, block_size=4, prompt_cache=cache)
    cache.trim_to(6)
    assert cache.tokens == PROMPTS[1][:6] and cache.offset + len(cache.pending) == 6
    got, last = ours(model, tokenizer, PROMPTS[1][6:], max_tokens=12, block_size=4, prompt_cache=cache)
    assert last.prompt_tokens == len(PROMPTS[1]) - 6
    assert got == mlx_lm_greedy(base, PROMPTS[1], 12, tokenizer.eos_token_ids)


def test_stop_strings_cut_verified_text(gated):
    _, _, model, tokenizer = gated
    text = mlx_sbd.generate(model, tokenizer, PROMPTS[0], max_tokens=30, block_size=8)
    stop = text[5:7]
    assert mlx_sbd.generate(model, tokenizer, PROMPTS[0], max_tokens=30, block_size=8, stop=[stop]) == text[: text.find(stop)]


def test_auto_reports_each_forward_to_its_cost(gated, monkeypatch):
    """auto's time(rows) sees every verified forward it priced (costs.ContextCost.observe checks itself against
    them): one report per forward, with that forward's rows, cached tokens and whole time; the output is still
    mlx_lm's."""
    from mlx_sbd import costs

    base, _, model, tokenizer = gated
    seen = []

    class Spy(costs.ContextCost):
        def observe(self, rows, context, seconds, predraft=False, branch=False):
            seen.append((rows, context, seconds))

    monkeypatch.setattr(decode, "cached_row_cost", lambda m: Spy({256: {1: 1.0, 32: 1.0}}))  # rows free: long drafts
    for ids in PROMPTS:
        seen.clear()
        tic = time.perf_counter()
        got, last = ours(model, tokenizer, ids, max_tokens=20, draft="auto")
        elapsed = time.perf_counter() - tic
        assert got == mlx_lm_greedy(base, ids, 20)
        # each forward's whole time: the reports add up to most of the generation's (0.74-0.96 here; a clock started
        # after async_eval, when the CPU had already run most of the forward, read 0.03-0.06)
        assert sum(t for _, _, t in seen) > 0.4 * elapsed
        assert len(seen) == last.nfe and sum(r for r, _, _ in seen) == last.rows > last.nfe  # drafts were sent
        contexts = [c for _, c, _ in seen]
        assert contexts[0] == len(ids) - 1 and contexts == sorted(contexts) and contexts[-1] < len(ids) + 20
        assert all(0 < t < 60 for _, _, t in seen)


def test_auto_solves_its_plan_while_a_forward_runs(gated, monkeypatch):
    """The scheduled solves of auto's plan (drafting.SOLVE_EVERY) run in Drafter.think, which the loop calls after
    launching a forward (while it computes), with the arguments the last plan had; plan() itself solves only at
    the start (and when an estimate jumps or time(rows) is read again, both turned off here). The output is still
    mlx_lm's."""
    from mlx_sbd import costs, drafting
    from mlx_sbd.planning import Planner

    base, _, model, tokenizer = gated
    where, inside = [], []
    solve, think = Planner.solve, drafting.Drafter.think

    def spy_solve(self, *args, **kw):
        where.append("think" if inside else "plan")
        return solve(self, *args, **kw)

    def spy_think(self):
        inside.append(1)
        try:
            think(self)
        finally:
            inside.pop()

    monkeypatch.setattr(Planner, "solve", spy_solve)
    monkeypatch.setattr(drafting.Drafter, "think", spy_think)
    monkeypatch.setattr(drafting, "SOLVE_TOLERANCE", float("inf"))
    monkeypatch.setattr(drafting, "SOLVE_EVERY", 4)
    monkeypatch.setattr(drafting, "PRICE_TOKENS", 1 << 20)  # prices read again (a solve in plan): not in this run
    monkeypatch.setattr(drafting, "PRICE_ROWS", 1 << 10)
    monkeypatch.setattr(decode, "cached_row_cost", lambda m: costs.ContextCost({256: {1: 1.0, 32: 1.2}}))
    got, last = ours(model, tokenizer, PROMPTS[0], max_tokens=40, draft="auto")
    assert got == mlx_lm_greedy(base, PROMPTS[0], 40)
    assert where[0] == "plan" and where.count("plan") == 1, where
    assert where.count("think") == last.nfe // drafting.SOLVE_EVERY and last.nfe > 2 * drafting.SOLVE_EVERY, (where, last.nfe)


def test_ungated_adapter_equals_its_own_one_token_decoding(gated, tmp_path):
    """An ungated adapter changes the causal path: verified decoding then reproduces its own block_size=1 output."""
    base = gated[0]
    model = load_model(base)
    make_trainable(model, "lora", -1, LORA, gated=False)
    randomize_lora(model, seed=5)
    save_adapter(model, tmp_path / "a", {"fine_tune_type": "lora", "num_layers": 2, "lora_parameters": LORA,
                                         "sbd": SBDSettings(8, 4, 1.0).to_dict()})
    model, tokenizer = mlx_sbd.load(base, adapter_path=tmp_path / "a")
    for ids in PROMPTS[:2]:
        one, _ = ours(model, tokenizer, ids, max_tokens=30, block_size=1)
        assert ours(model, tokenizer, ids, max_tokens=30, block_size=8, gamma=float("inf"))[0] == one
        assert one != mlx_lm_greedy(base, ids, 30, tokenizer.eos_token_ids)  # the adapter does change the path


def test_cache_that_cannot_trim_is_refused(gated):
    from mlx_lm.models.cache import RotatingKVCache

    _, _, model, tokenizer = gated
    cache = mlx_sbd.make_prompt_cache(model)
    cache.layers = [RotatingKVCache(max_size=4) for _ in cache.layers]
    model(mx.array([PROMPTS[1]]), cache=cache.layers)  # past its size: no longer trimmable
    with pytest.raises(SBDError, match="cannot be trimmed"):
        mlx_sbd.generate(model, tokenizer, [5, 6], prompt_cache=cache, block_size=4)


def test_gated_adapter_on_the_wrong_base_is_refused(gated, tmp_path):
    other = make_tiny_model(tmp_path / "other", hidden_size=32, num_hidden_layers=1, intermediate_size=64)
    with pytest.raises(SBDError, match="different base model"):
        mlx_sbd.load(other, adapter_path=gated[1])


def test_gated_adapter_cannot_be_fused(gated, tmp_path):
    from mlx_sbd.fuse import fuse

    with pytest.raises(SBDError, match="gated"):
        fuse(gated[0], gated[1], tmp_path / "fused")


def test_interrupted_adapter_write_is_refused(gated, tmp_path):
    """The weight files and the config carry one save id: a write killed between files is refused, not mixed."""
    import shutil

    folder = tmp_path / "a"
    shutil.copytree(gated[1], folder)
    model, _ = mlx_sbd.load(gated[0], adapter_path=False), None
    model = model[0]
    make_trainable(model, "lora", -1, LORA, gated=True)
    save_adapter(model, tmp_path / "b", {"fine_tune_type": "lora", "gated": True, "num_layers": 2,
                                         "lora_parameters": LORA})
    shutil.copy(tmp_path / "b" / "adapters.safetensors", folder / "adapters.safetensors")  # one file of another save
    with pytest.raises(SBDError, match="another save"):
        mlx_sbd.load(gated[0], adapter_path=folder)


# --- sampling --------------------------------------------------------------------------------------------------
def exact_first_tokens(lm, ids, n, temp):
    """P(t1..tn) for every sequence, by causal forwards on the base (mlx_lm's sampling distribution at `temp`)."""
    probs = {(): 1.0}
    for _ in range(n):
        seqs = list(probs)
        logits = mx.stack([lm(mx.array([ids + list(s)]))[0, -1] for s in seqs])
        p = np.array(mx.softmax(logits.astype(mx.float32) / temp, axis=-1))
        probs = {s + (t,): probs[s] * p[i, t] for i, s in enumerate(seqs) for t in range(p.shape[1])}
    return probs


def sampled_first_tokens(model, tokenizer, ids, n, draws, temp, **kw):
    """{first n tokens: count} over `draws` generations (a count: seeds 0..draws-1; or the seeds themselves)."""
    counts = {}
    for i in range(draws) if isinstance(draws, int) else draws:
        out, _ = ours(model, tokenizer, ids, max_tokens=n + 1, temp=temp, seed=i, **kw)
        key = tuple(out[:n])
        counts[key] = counts.get(key, 0) + 1
    return counts


def chi_square_p(counts, probs, draws):
    """Pearson chi-square test of counts against probs, cells with expected count < 5 pooled; returns the p-value."""
    import torch

    keys = sorted(probs, key=lambda s: -probs[s])
    exp, obs, pool_e, pool_o = [], [], 0.0, 0
    for s in keys:
        e = probs[s] * draws
        if e >= 5:
            exp.append(e), obs.append(counts.get(s, 0))
        else:
            pool_e, pool_o = pool_e + e, pool_o + counts.get(s, 0)
    exp.append(pool_e), obs.append(pool_o + sum(c for s, c in counts.items() if s not in probs))
    chi2 = sum((o - e) ** 2 / e for o, e in zip(obs, exp) if e > 0)
    dof = len(exp) - 1  # chi-square survival function = the upper regularised incomplete gamma Q(dof/2, chi2/2)
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64),
                                         torch.tensor(chi2 / 2, dtype=torch.float64))), chi2


@dataclass
class Sampling:
    """A sampling test's model and tokenizer, with what built them (sampling_model): a worker process given `base`
    and `std` builds the same model (seeded), so draws can be shared among processes."""
    base: str
    std: float
    model: object
    tokenizer: object


def sampling_model(base, std: float):
    """The tiny base at `base` with a random gated LoRA of scale `std` (seed 1) and no end-of-sequence token."""
    model = load_model(base)
    make_trainable(model, "lora", -1, LORA, gated=True)
    randomize_lora(model, seed=1, std=std, mask=False)
    _, tokenizer = mlx_sbd.load(base)
    tokenizer.eos_token_ids = set()
    return model, tokenizer


def sampling_setup(base, std: float) -> Sampling:
    return Sampling(str(base), std, *sampling_model(base, std))


@pytest.fixture(scope="module")
def small_vocab(tmp_path_factory):
    """A 1-layer model over 3 letters (vocab 7) with a random gated adapter. p is spread and q (the drafter) differs
    from it but overlaps (at the first draft p ~ [.03 .05 .02 .26 .06 .04 .54], q ~ [.46 .05 .21 .11 .02 .03 .13]):
    drafts are often rejected and often accepted, so both the acceptance ratio and the residual matter."""
    root = tmp_path_factory.mktemp("sampling")
    base = make_tiny_model(root / "base", hidden_size=32, num_hidden_layers=1, intermediate_size=64,
                           num_attention_heads=2, num_key_value_heads=1, alphabet="abc", seed=2)
    return sampling_setup(base, 0.2)


@contextmanager
def counting_rescues(rescued: list):
    """Within: every verified generation appends the rescues its last step reports (branch rows) to `rescued`."""
    real = decode.verified_steps

    def counting(*a, **kw):
        last = None
        try:
            for last in real(*a, **kw):
                yield last
        finally:  # the caller closes the generator once it has its tokens
            rescued.append(last.rescued if last is not None else 0)

    decode.verified_steps = counting
    try:
        yield
    finally:
        decode.verified_steps = real


def _draws_in_a_process(base, std, ids, n, seeds, temp, kw):
    """A worker process's share of sampled_first_tokens (the draws of `seeds`), and the rescues it saw."""
    model, tokenizer = sampling_model(base, std)
    rescued = []
    with counting_rescues(rescued):
        return sampled_first_tokens(model, tokenizer, ids, n, seeds, temp, **kw), sum(rescued)


def sampled_in_processes(setup: Sampling, ids, n, draws, temp, workers, **kw):
    """(counts, rescues): sampled_first_tokens' draws (seeds 0..draws-1, as there) shared among `workers` processes,
    each building the model from `setup`: the same counts, in about 0.6x the time on two cores."""
    shares = [range(w, draws, workers) for w in range(workers)]
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        parts = [f.result() for f in [pool.submit(_draws_in_a_process, setup.base, setup.std, ids, n, share, temp, kw)
                                      for share in shares]]
    counts = {}
    for part, _ in parts:
        for key, c in part.items():
            counts[key] = counts.get(key, 0) + c
    return counts, sum(r for _, r in parts)


def run_sampling_test(setup: Sampling, draws, layout="linear", workers=1, rescued=None, **kw):
    """p-value (and chi2) of `draws` verified samples of the first 3 tokens (block 4, every guess a draft, `kw` more
    decoding settings) against the base's exact distribution; the draws shared among `workers` processes; the
    rescues seen (branch rows) appended to `rescued`."""
    ids = [4, 5, 6]
    probs = exact_first_tokens(setup.model, ids, 3, temp=1.0)
    kw = dict(block_size=4, gamma=float("inf"), layout=layout, **kw)
    if workers > 1:
        counts, rescues = sampled_in_processes(setup, ids, 3, draws, 1.0, workers, **kw)
    else:
        counted = []
        with counting_rescues(counted):
            counts = sampled_first_tokens(setup.model, setup.tokenizer, ids, 3, draws, 1.0, **kw)
        rescues = sum(counted)
    if rescued is not None:
        rescued.append(rescues)
    return chi_square_p(counts, probs, draws)


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["linear", "predraft"])
def test_verified_sampling_keeps_the_distribution(small_vocab, layout):
    """20k draws of the first 3 tokens under verified sampling against the exact NTP distribution of the base."""
    p, chi2 = run_sampling_test(small_vocab, 20000, layout, workers=2)
    assert p > 1e-3, f"chi2 {chi2:.1f}, p {p:.2g}"


@pytest.mark.parametrize("layout", ["linear", "predraft"])
def test_verified_sampling_keeps_the_distribution_fast(small_vocab, layout):
    p, chi2 = run_sampling_test(small_vocab, 3000, layout)
    assert p > 1e-3, f"chi2 {chi2:.1f}, p {p:.2g}"


def test_draws_shared_among_processes_are_the_draws_of_one(small_vocab):
    """The slow sampling tests share their draws between two processes that build the model themselves: the counts
    must be exactly those of the same seeds drawn here (same model, same seeds, none twice or left out)."""
    kw = dict(block_size=4, gamma=float("inf"), layout="linear")
    here = sampled_first_tokens(small_vocab.model, small_vocab.tokenizer, [4, 5, 6], 3, 60, 1.0, **kw)
    counts, _ = sampled_in_processes(small_vocab, [4, 5, 6], 3, 60, 1.0, 2, **kw)
    assert counts == here and sum(counts.values()) == 60


@pytest.mark.parametrize("layout", ["linear", "predraft"])
def test_verified_sampling_with_windowed_mask_rows(small_vocab, layout, monkeypatch):
    """Mask rows that see only the last cached key (their drafts and q change together) keep the distribution."""
    calls = spy_on_windows(monkeypatch, 1)
    p, chi2 = run_sampling_test(small_vocab, 3000, layout)
    assert calls
    assert p > 1e-3, f"chi2 {chi2:.1f}, p {p:.2g}"


@pytest.mark.parametrize("stop_after", [1, 3])
def test_stopping_early_leaves_the_cache_exact(gated, stop_after):
    """The next forward is already in flight when a step is yielded: a caller that stops reading (a stop string, a
    client gone) must still leave the cache holding exactly the conversation, and the next turn stays lossless."""
    base, _, model, tokenizer = gated
    cache = mlx_sbd.make_prompt_cache(model)
    for i, r in enumerate(mlx_sbd.stream_generate(model, tokenizer, PROMPTS[1], max_tokens=40, block_size=8,
                                                  gamma=float("inf"), prompt_cache=cache)):
        if i + 1 == stop_after:
            break
    assert cache.offset + len(cache.pending) == len(cache.tokens)
    history = list(cache.tokens)
    second, _ = ours(model, tokenizer, [40, 41], max_tokens=15, block_size=8, prompt_cache=cache)
    assert second == mlx_lm_greedy(base, history + [40, 41], 15, tokenizer.eos_token_ids)


def two_pending(model, ids):
    """A fresh cache holding `ids` with its last two tokens pending (x and the one before it), as a forward after a
    prompt sees them: the layouts' tests build their forwards on it."""
    cache = mlx_sbd.make_prompt_cache(model)
    decode.prefill(model, cache, ids, keep=2)
    return cache


def test_predraft_blocks_are_the_linear_blocks_after_the_same_drafts(gated):
    """Pre-drafting's block i (after d_i) is, row for row, the linear layout's single block after exactly d1..di:
    same positions, same visible keys, the same gated rows (hidden states compared in float32)."""
    from mlx_sbd.masks import predraft_spans
    from mlx_sbd.attention import make_span_mask
    from mlx_sbd.model import MASK_ID

    _, _, model, _ = gated
    ids, drafts, k = PROMPTS[1], [3, 17, 40, 9], 4
    m = len(drafts)

    cache = two_pending(model, ids)
    pending = len(cache.pending)
    inputs = mx.array(cache.pending + drafts + [MASK_ID] * ((m + 1) * k))[None]
    positions, visible, lo, hi = predraft_spans(cache.offset, pending, m, k)
    mask = make_span_mask(visible, lo, hi, cache.offset + inputs.shape[1])
    h = model.forward(inputs, positions=positions, mask=mask, cache=cache.layers, return_hidden=True,
                      mask_rows=(m + 1) * k)[0]
    blocks = np.array(h[pending + m :]).reshape(m + 1, k, -1)
    for i in range(m + 1):
        cache = two_pending(model, ids)
        x = mx.array(cache.pending + drafts[:i] + [MASK_ID] * k)[None]
        linear = model.forward(x, mask=decode.BlockMask(causal_point=pending + i), cache=cache.layers,
                               return_hidden=True, mask_rows=k)[0, -k:]
        assert np.abs(blocks[i] - np.array(linear)).max() < 1e-4, i
        if i:
            assert np.abs(blocks[i - 1] - np.array(linear)).max() > 1e-2  # blocks differ: the test can tell them apart
