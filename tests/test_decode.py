"""Decode loop: exact KV cache, per-step logits, NTP path == mlx_lm, stopping, NFE, bad input.

References: a fresh causal forward (cache exactness), a from-scratch forward with a mask built here from the
rule in SBD_METHOD.md §3 (per-step logits), mlx_lm's generate_step (NTP path).
"""

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.generate import generate_step

import mlx_sbd
from mlx_sbd import decode
from mlx_sbd.decode import make_prompt_cache, prefill, prefill_prompt, sbd_steps, split_prompt
from mlx_sbd.errors import SBDError
from mlx_sbd.loading import load_model
from mlx_sbd.masks import training_mask
from mlx_sbd.model import MASK_ID
from mlx_sbd.samplers import make_selector, make_token_sampler
from mlx_sbd.tiny import make_tiny_model

PROMPT = [10, 20, 30, 11, 21, 31, 12, 22, 32, 13, 23]


@pytest.fixture(scope="module", params=["llama", "qwen3"])
def tiny(request, tmp_path_factory):
    folder = make_tiny_model(tmp_path_factory.mktemp(request.param), model_type=request.param, hidden_size=64,
                             num_hidden_layers=2, intermediate_size=128, seed=1)
    model = load_model(folder)
    # Random weights are near-uniform; sharpen them so the EB-Sampler reveals several tokens per forward.
    model.lm.model.norm.weight = model.lm.model.norm.weight * 30
    return folder, model


def run_sbd(model, k, gamma, max_tokens=40, eos=(), ntp_first=False):
    cache = make_prompt_cache(model)
    if ntp_first:
        head, first = prefill_prompt(model, cache, PROMPT, k)
    else:
        ids, head = split_prompt(cache, PROMPT, k)
        prefill(model, cache, ids)
        first = None
    out, nfe = [], 0
    for step in sbd_steps(model, cache, block_size=k, select=make_selector("entropy", gamma),
                          sample=make_token_sampler(0.0), max_tokens=max_tokens, max_length=4096,
                          eos_ids=eos, head=head, first=first):
        out, nfe = out + step.tokens, step.nfe
    return out, nfe, cache


@pytest.mark.parametrize("k,gamma", [(4, 0.5), (8, 2.0), (16, 5.0)])
def test_cache_equals_fresh_causal_forward(tiny, k, gamma):
    _, model = tiny
    out, nfe, cache = run_sbd(model, k, gamma)
    assert nfe < len(out), "test needs several tokens per forward to be meaningful"
    prefill(model, cache, [])  # commit the last block, as the next turn would
    fresh = model.make_cache()
    model(mx.array(PROMPT + out)[None], cache=fresh)
    n = len(PROMPT) + len(out)
    assert cache.offset == n
    for got, ref in zip(cache.layers, fresh):
        for a, b in ((got.keys, ref.keys), (got.values, ref.values)):
            assert np.abs(np.array(a[..., :n, :]) - np.array(b[..., :n, :])).max() <= 1e-5


def test_each_step_equals_from_scratch_forward(tiny, monkeypatch):
    _, model = tiny
    k, records = 4, []
    real = decode.block_forward

    def recording(model_, tokens, k_, cache, causal=False):
        offset = cache.offset
        logprobs = real(model_, tokens, k_, cache, causal)
        records.append((offset, list(tokens), k_, np.array(logprobs)))
        return logprobs

    monkeypatch.setattr(decode, "block_forward", recording)
    out, nfe, _ = run_sbd(model, k, 0.05, max_tokens=24)
    assert 24 // k < len(records) == nfe < 24  # both block-wide and 2k-wide forwards, several tokens per forward
    history = PROMPT + out
    for offset, tokens, k, logprobs in records:  # k: this block's size (the first one is shorter)
        seq = history[:offset] + tokens  # committed tokens + this forward's input
        n, cp = len(seq), len(seq) - k  # queries from position cp on are the block
        i, j = np.arange(n)[:, None], np.arange(n)[None, :]
        mask = (j <= i) | (i >= cp)
        logits = model.forward(mx.array(seq)[None], mask=mx.array(mask))[0, -k:]
        ref = np.array(logits - mx.logsumexp(logits, axis=-1, keepdims=True))
        assert np.abs(ref - logprobs).max() <= 1e-5 * np.abs(ref).max()  # float32, logprobs up to ~200
    # the block input always ends with k positions, masks included, and never a mask in the causal prefix
    assert all(MASK_ID not in tokens[:-k] for _, tokens, k, _ in records)


@pytest.mark.parametrize("k", [4, 8, 16])
def test_first_block_sees_the_prompt_as_training_does(tiny, monkeypatch, k):
    """The prompt's tail after its last multiple of k opens the first block as revealed tokens and is not in the
    cache, as in training: the block's log-probabilities equal the noised half of a training forward
    (masks.training_mask) whose noised copy masks every position after the prompt."""
    _, model = tiny
    first = []
    real = decode.block_forward

    def recording(model_, tokens, k_, cache, causal=False):
        logprobs = real(model_, tokens, k_, cache, causal)
        if not first:
            first.append((cache.offset, list(tokens), k_, np.array(logprobs)))
        return logprobs

    monkeypatch.setattr(decode, "block_forward", recording)
    run_sbd(model, k, 0.5, max_tokens=10)
    offset, tokens, k_, logprobs = first[0]
    start = len(PROMPT) // k * k
    L = start + k
    assert (offset, k_, tokens) == (start, k, PROMPT[start:] + [MASK_ID] * (L - len(PROMPT)))
    clean = PROMPT + [0] * (L - len(PROMPT))  # after the prompt: positions no query of this block may see
    noised = PROMPT + [MASK_ID] * (L - len(PROMPT))
    logits = model.forward(mx.array(clean + noised)[None], positions=mx.array(list(range(L)) * 2),
                           mask=training_mask(L, k))[0, L + start :]
    ref = np.array(logits - mx.logsumexp(logits, axis=-1, keepdims=True))
    assert np.abs(ref - logprobs).max() <= 1e-5 * np.abs(ref).max()


@pytest.mark.parametrize("k,max_tokens", [(4, 23), (8, 40)])
def test_blocks_end_at_multiples_of_k_as_in_training(tiny, monkeypatch, k, max_tokens):
    """Training blocks sit at 0, k, 2k, ... of the sequence (masks.training_mask), so decode blocks must too: the
    first block is the prompt's last block (its tail revealed, the rest masked), the last one is cut by max_tokens."""
    _, model = tiny
    spans = []
    real = decode.block_forward

    def recording(model_, tokens, k_, cache, causal=False):
        start = cache.offset + len(tokens) - k_  # absolute position of the block's first token
        if not spans or spans[-1] != (start, start + k_):  # a block takes one or more forwards
            spans.append((start, start + k_))
        return real(model_, tokens, k_, cache, causal)

    monkeypatch.setattr(decode, "block_forward", recording)
    out, _, _ = run_sbd(model, k, 0.5, max_tokens=max_tokens)
    assert len(out) == max_tokens
    end = len(PROMPT) + max_tokens
    edges = [len(PROMPT) // k * k] + [p for p in range(len(PROMPT) + 1, end) if p % k == 0] + [end]
    assert spans == list(zip(edges[:-1], edges[1:]))


def causal_argmax(model, history):
    """The plain causal model's (mlx_lm's own forward) greedy next token after `history`."""
    return model.lm(mx.array(history)[None])[0, -1].argmax().item()


@pytest.mark.parametrize("k,gamma", [(4, 0.5), (8, 2.0)])
def test_ntp_first_takes_every_blocks_first_token_from_the_causal_path(tiny, monkeypatch, k, gamma):
    """With ntp_first, the first open position of every block gets the causal path's greedy token given all the
    tokens before it; a forward whose masked guess there differs reveals that token alone; the cache stays exact."""
    _, model = tiny
    records = []  # per forward: (absolute start of the block, block input, masked-path argmax per block position)
    real = decode.block_forward

    def recording(model_, tokens, k_, cache, causal=False):
        start = cache.offset + len(tokens) - k_
        logprobs = real(model_, tokens, k_, cache, causal)
        records.append((start, list(tokens[-k_:]), np.array(logprobs[-k_:]).argmax(axis=-1)))
        return logprobs

    monkeypatch.setattr(decode, "block_forward", recording)
    out, nfe, cache = run_sbd(model, k, gamma, max_tokens=40, ntp_first=True)
    assert nfe < len(out), "test needs several tokens per forward to be meaningful"
    history, agree, disagree = PROMPT + out, 0, 0
    for i, (start, blk, guess) in enumerate(records):
        same_block_next = i + 1 < len(records) and records[i + 1][0] == start
        after = records[i + 1][1] if same_block_next else history[start : start + len(blk)]
        c = max(len(PROMPT) - start, 0)  # the block's first open position
        if blk[c] != MASK_ID:
            continue
        if after[c] != MASK_ID:
            assert after[c] == causal_argmax(model, history[: start + c])
        if guess[c] != causal_argmax(model, history[: start + c]):
            disagree += 1
            assert [j for j in range(len(blk)) if blk[j] == MASK_ID and after[j] != MASK_ID] == [c]
        else:
            agree += 1
    assert agree and disagree, "test needs forwards where the two paths agree and where they differ"
    prefill(model, cache, [])  # commit the last block: the cache must equal a fresh causal forward's
    fresh = model.make_cache()
    model(mx.array(history)[None], cache=fresh)
    n = len(history)
    for got, ref in zip(cache.layers, fresh):
        for a, b in ((got.keys, ref.keys), (got.values, ref.values)):
            assert np.abs(np.array(a[..., :n, :]) - np.array(b[..., :n, :])).max() <= 1e-5


def test_gamma_zero_reveals_one_token_per_forward(tiny):
    _, model = tiny
    out, nfe, _ = run_sbd(model, 8, 0.0, max_tokens=24)
    assert len(out) == nfe == 24


def test_eos_stops_after_everything_before_it_is_revealed(tiny):
    _, model = tiny
    out, _, _ = run_sbd(model, 8, 2.0, max_tokens=40)
    eos = out[5]
    first = out.index(eos)
    stopped, nfe, _ = run_sbd(model, 8, 2.0, max_tokens=40, eos=[eos])
    assert stopped == out[:first]
    full_nfe = run_sbd(model, 8, 2.0, max_tokens=first + 1)[1]
    assert nfe <= full_nfe  # no forwards counted after the stop


def test_block_size_one_equals_mlx_lm_greedy(tiny):
    folder, model = tiny
    _, tokenizer = mlx_sbd.load(folder)
    ours = []
    for r in mlx_sbd.stream_generate(model, tokenizer, PROMPT, max_tokens=30, block_size=1):
        ours += r.tokens
    ref = []
    for tok, _ in generate_step(mx.array(PROMPT), model.lm, max_tokens=30):
        if tok in tokenizer.eos_token_ids:
            break
        ref.append(tok)
    assert ours == ref and len(ours) > 0


def test_stream_generate_reports(tiny):
    folder, model = tiny
    _, tokenizer = mlx_sbd.load(folder)
    chunks = list(mlx_sbd.stream_generate(model, tokenizer, PROMPT, max_tokens=20, block_size=8, gamma=2.0))
    last = chunks[-1]
    assert last.finish_reason in ("stop", "length")
    assert last.generation_tokens == sum(len(c.tokens) for c in chunks)
    assert last.nfe == max(c.nfe for c in chunks) and last.nfe >= 1
    text = mlx_sbd.generate(model, tokenizer, PROMPT, max_tokens=20, block_size=8, gamma=2.0)
    assert text == "".join(c.text for c in chunks)


def test_multi_turn_cache_reuse_matches_single_call(tiny):
    folder, model = tiny
    _, tokenizer = mlx_sbd.load(folder)
    cache = mlx_sbd.make_prompt_cache(model)
    first = [t for r in mlx_sbd.stream_generate(model, tokenizer, PROMPT, max_tokens=12, block_size=4, gamma=1.0,
                                               prompt_cache=cache) for t in r.tokens]
    follow = [40, 41, 42]
    second = [t for r in mlx_sbd.stream_generate(model, tokenizer, follow, max_tokens=12, block_size=4, gamma=1.0,
                                                prompt_cache=cache) for t in r.tokens]
    fresh = [t for r in mlx_sbd.stream_generate(model, tokenizer, PROMPT + first + follow, max_tokens=12,
                                               block_size=4, gamma=1.0) for t in r.tokens]
    assert second == fresh


def test_stop_strings_cut_the_text(tiny):
    folder, model = tiny
    _, tokenizer = mlx_sbd.load(folder)
    text = mlx_sbd.generate(model, tokenizer, PROMPT, max_tokens=20, block_size=4, gamma=1.0)
    assert len(text) > 4
    stop = text[3:5]
    cut = mlx_sbd.generate(model, tokenizer, PROMPT, max_tokens=20, block_size=4, gamma=1.0, stop=[stop])
    assert cut == text[: text.find(stop)]


@pytest.mark.parametrize("kwargs,match", [
    (dict(block_size=0), "block_size"),
    (dict(gamma=-0.1), "gamma"),
    (dict(max_tokens=0), "max_tokens"),
    (dict(selector="nope"), "sampler|selector|nope"),
])
def test_bad_settings(tiny, kwargs, match):
    folder, model = tiny
    _, tokenizer = mlx_sbd.load(folder)
    with pytest.raises(SBDError, match=match):
        mlx_sbd.generate(model, tokenizer, PROMPT, **kwargs)


def test_prompt_longer_than_context(tmp_path):
    folder = make_tiny_model(tmp_path / "m", hidden_size=32, num_hidden_layers=1, intermediate_size=64,
                             max_position_embeddings=16)
    model, tokenizer = mlx_sbd.load(folder)
    with pytest.raises(SBDError, match="context"):
        mlx_sbd.generate(model, tokenizer, list(range(5, 25)))


@pytest.mark.slow
def test_block_size_one_equals_mlx_lm_on_smollm2():
    """The real built-in model: our NTP path and mlx_lm.generate give the same greedy tokens."""
    from mlx_lm.generate import stream_generate as mlx_lm_stream_generate

    from mlx_sbd.generate import encode_prompt

    model, tokenizer = mlx_sbd.load(adapter_path=False)  # the plain base: what mlx_lm.generate runs
    ids = encode_prompt(tokenizer, "Name three uses of a paperclip.")
    ours = [t for r in mlx_sbd.stream_generate(model, tokenizer, ids, max_tokens=48, block_size=1) for t in r.tokens]
    ref = [r.token for r in mlx_lm_stream_generate(model.lm, tokenizer, mx.array(ids), max_tokens=48)]
    ref = ref[:-1] if ref[-1] in tokenizer.eos_token_ids else ref  # mlx_lm's last response carries the EOS
    assert ours == ref and len(ours) > 10


def test_prompts_as_text_messages_or_ids(tmp_path):
    """Strings get the chat template when the tokenizer has one (as mlx_lm's CLI does); messages always do."""
    import json

    folder = make_tiny_model(tmp_path / "m", hidden_size=32, num_hidden_layers=1, intermediate_size=64)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["chat_template"] = "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}A:"
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    _, tokenizer = mlx_sbd.load(folder)
    from mlx_sbd.generate import encode_prompt

    chat = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "1+1"}]
    expected = tokenizer.encode("<s>system: be brief\n<s>user: 1+1\nA:", add_special_tokens=False)
    assert encode_prompt(tokenizer, chat) == expected
    assert encode_prompt(tokenizer, "1+1", system_prompt="be brief") == expected
    assert encode_prompt(tokenizer, "1+1", chat_template=False) == tokenizer.encode("1+1", add_special_tokens=False)
    assert encode_prompt(tokenizer, [7, 8, 9]) == [7, 8, 9]


def test_unset_block_size_and_gamma_follow_the_model(tiny):
    """No SBD training: one token per forward; an SBD model: the block size and gamma stored with it (gamma inf for
    draft auto)."""
    import types

    from mlx_sbd.generate import default_settings
    from mlx_sbd.model import SBDSettings

    _, model = tiny
    assert default_settings(model, None, None) == (1, 0.1)
    trained = types.SimpleNamespace(sbd=SBDSettings(block_size_max=8, block_size=4, gamma=0.35))
    assert default_settings(trained, None, None) == (4, 0.35)
    assert default_settings(trained, 2, 0.0) == (2, 0.0)
    # draft auto offers every guess of the mask block (auto chooses how many to send); an explicit gamma stays
    assert default_settings(trained, None, None, "auto") == (4, float("inf"))
    assert default_settings(trained, None, 0.2, "auto") == (4, 0.2)
    assert default_settings(trained, None, None, "sbd") == (4, 0.35)
