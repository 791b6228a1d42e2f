"""Verified decoding on the real built-in SmolLM2-135M (slow): lossless against mlx_lm.generate on the base weights.

- A gated adapter (random LoRA weights: any gated adapter must pass) gives token for token what mlx_lm.generate
  gives on the base weights loaded by mlx_lm itself, on 8 prompts, with stop strings and a multi-turn cache.
- The shipped ungated adapter gives its own block_size=1 output; its drafts are good enough that EOS and
  max_tokens fall inside accepted drafts, which the test checks happened.
"""

import mlx.core as mx
import mlx_lm
import pytest
from mlx.utils import tree_flatten
from mlx_lm.generate import stream_generate as mlx_lm_stream_generate

import mlx_sbd
from mlx_sbd.adapter import make_trainable, save_adapter
from mlx_sbd.generate import encode_prompt
from mlx_sbd.gguf import default_model_path
from mlx_sbd.loading import UNGATED_ADAPTER, load_model
from mlx_sbd.model import SBDSettings

pytestmark = pytest.mark.slow

PROMPTS = [
    "What is the capital of France?",
    "Name three uses of a paperclip.",
    "Write a haiku about tea.",
    "Explain what a Python list comprehension is, in one sentence.",
    "What is 12 times 12?",
    "Translate 'good morning' into French.",
    "Give me a one-line definition of entropy.",
    "List the first five prime numbers.",
]
N = 40


@pytest.fixture(scope="module")
def base():
    folder = default_model_path()
    lm, tokenizer = mlx_lm.load(str(folder))  # the reference: mlx_lm on the base weights
    return folder, lm, tokenizer


@pytest.fixture(scope="module")
def gated(base, tmp_path_factory):
    folder = base[0]
    model = load_model(folder)
    make_trainable(model, "lora", 8, {"rank": 4, "scale": 10.0, "dropout": 0.0}, gated=True)
    mx.random.seed(0)
    model.lm.load_weights([(k, mx.random.normal(v.shape) * 0.05) for k, v in
                           tree_flatten(model.lm.trainable_parameters())], strict=False)
    path = tmp_path_factory.mktemp("gated") / "adapter"
    save_adapter(model, path, {"fine_tune_type": "lora", "gated": True, "num_layers": 8,
                               "lora_parameters": {"rank": 4, "scale": 10.0, "dropout": 0.0},
                               "sbd": SBDSettings(8, 8, 0.35).to_dict()})
    return mlx_sbd.load(folder, adapter_path=path)


def reference(lm, tokenizer, ids, n=N):
    out = [r.token for r in mlx_lm_stream_generate(lm, tokenizer, mx.array(ids), max_tokens=n)]
    return out[:-1] if out and out[-1] in tokenizer.eos_token_ids else out  # mlx_lm's last response carries EOS


def verified(model, tokenizer, prompt, **kw):
    out, steps = [], []
    for r in mlx_sbd.stream_generate(model, tokenizer, prompt, **kw):
        out += r.tokens
        steps.append(r)
    return out, steps


def test_gated_adapter_output_is_mlx_lm_on_the_base(base, gated):
    _, lm, ref_tok = base
    model, tokenizer = gated
    for p in PROMPTS:
        ids = encode_prompt(tokenizer, p)
        got, steps = verified(model, tokenizer, ids, max_tokens=N, block_size=8, gamma=float("inf"), draft="sbd")
        assert got == reference(lm, ref_tok, ids), p
        assert steps[-1].drafted > 0


@pytest.mark.parametrize("layout", ["linear", "predraft"])
def test_mask_rows_window_keeps_the_output(base, gated, layout, monkeypatch):
    """A prompt longer than the mask rows' window (attention.DRAFT_WINDOW, here 32): mlx_lm's output still."""
    from test_verified import spy_on_windows

    _, lm, ref_tok = base
    model, tokenizer = gated
    calls = spy_on_windows(monkeypatch, 32)
    ids = encode_prompt(tokenizer, " ".join(PROMPTS))  # ~90 tokens
    got, _ = verified(model, tokenizer, ids, max_tokens=N, block_size=8, gamma=float("inf"), draft="sbd", layout=layout)
    assert got == reference(lm, ref_tok, ids)
    assert calls


def test_stop_strings_and_multi_turn_cache(base, gated):
    _, lm, ref_tok = base
    model, tokenizer = gated
    text = mlx_sbd.generate(model, tokenizer, PROMPTS[1], max_tokens=N, block_size=8)
    stop = text.split()[3]
    cut = mlx_sbd.generate(model, tokenizer, PROMPTS[1], max_tokens=N, block_size=8, stop=[stop])
    assert cut == text[: text.find(stop)]
    cache = mlx_sbd.make_prompt_cache(model)
    turn1 = [{"role": "user", "content": PROMPTS[0]}]
    verified(model, tokenizer, turn1, max_tokens=24, block_size=8, prompt_cache=cache)
    history = list(cache.tokens)
    follow = tokenizer.encode("<|im_start|>user\nAnd of Italy?<|im_end|>\n<|im_start|>assistant\n",
                              add_special_tokens=False)
    got, _ = verified(model, tokenizer, follow, max_tokens=24, block_size=8, prompt_cache=cache)
    assert got == reference(lm, ref_tok, history + follow, 24)


def test_shipped_ungated_adapter_equals_its_own_one_token_output():
    """With the shipped (ungated) adapter verified decoding reproduces the SBD model's own block_size=1 output,
    including where EOS or max_tokens fall inside accepted drafts."""
    model, tokenizer = mlx_sbd.load(adapter_path=UNGATED_ADAPTER)
    eos_in_drafts = cut_in_drafts = False
    for i, p in enumerate(PROMPTS[:5]):
        ids = encode_prompt(tokenizer, p)
        one, _ = verified(model, tokenizer, ids, max_tokens=N, block_size=1)
        got, steps = verified(model, tokenizer, ids, max_tokens=N, draft="sbd")  # the mask block's drafts every time
        assert got == one, p
        assert verified(model, tokenizer, ids, max_tokens=N)[0] == one, p  # the default (auto)
        last, before = steps[-1], steps[-2] if len(steps) > 1 else None
        # The last forward accepted more drafts than it showed tokens: the EOS was one of them.
        gained = last.accepted - (before.accepted if before else 0)
        eos_in_drafts |= last.finish_reason == "stop" and gained > len(last.tokens)
        for n in (5, 9) if i < 2 else ():  # max_tokens reached by a forward's accepted drafts
            cut, cut_steps = verified(model, tokenizer, ids, max_tokens=n, draft="sbd")
            assert cut == one[:n]
            cut_in_drafts |= len([s for s in cut_steps if s.tokens][-1].tokens) > 1
    assert eos_in_drafts and cut_in_drafts


def test_readme_first_command_prints_what_block_size_one_prints():
    from click.testing import CliRunner

    from mlx_sbd.cli import cli

    runner = CliRunner()
    default = runner.invoke(cli, ["generate", "-p", "What is the capital of France?", "--quiet"])
    one = runner.invoke(cli, ["generate", "-p", "What is the capital of France?", "--quiet", "--block-size", "1"])
    # the shipped adapter is gated: its output is the plain base model's, one token per forward
    plain = runner.invoke(cli, ["generate", "-p", "What is the capital of France?", "--quiet", "--no-adapter",
                                "--draft", "none"])
    assert default.exit_code == one.exit_code == plain.exit_code == 0
    assert default.output == one.output == plain.output and "Paris" in default.output


COPY_PROMPTS = [
    "Repeat this sentence exactly: The quick brown fox jumps over the lazy dog near the old river bank.",
    "Add type hints to this function:\n\ndef add(a, b):\n    total = a + b\n    return total\n",
]


def test_lookup_drafts_on_the_plain_base_are_lossless_and_end_inside_a_draft(base):
    """Prompt lookup on the base without any adapter: mlx_lm's output, drafts accepted where the answer copies the
    prompt, and an EOS that a lookup draft carries (a word of the copied sentence made the EOS) ends the answer."""
    _, lm, ref_tok = base
    model, tokenizer = mlx_sbd.load(adapter_path=False)
    for p in COPY_PROMPTS:
        ids = encode_prompt(tokenizer, p)
        got, steps = verified(model, tokenizer, ids, max_tokens=N, draft="lookup")
        assert got == reference(lm, ref_tok, ids), p
        assert steps[-1].accepted >= 5, p  # the copy is drafted
    ids = encode_prompt(tokenizer, COPY_PROMPTS[0])
    got, steps = verified(model, tokenizer, ids, max_tokens=N, draft="lookup")
    out, drafted_at = [], []
    for s in steps:
        drafted_at += range(len(out), len(out) + len(s.tokens) - 1)  # a forward's tokens but its last were drafts
        out += s.tokens
    j = next(j for j in drafted_at if out[j] not in out[:j] and j > 0)
    saved = tokenizer.eos_token_ids
    try:
        tokenizer.eos_token_ids = {out[j]}
        cut, steps = verified(model, tokenizer, ids, max_tokens=N, draft="lookup")
    finally:
        tokenizer.eos_token_ids = saved
    assert cut == out[:j] and steps[-1].finish_reason == "stop"
    ref = [r.token for r in mlx_lm_stream_generate(lm, ref_tok, mx.array(ids), max_tokens=N)]
    assert ref[: ref.index(out[j])] == cut  # mlx_lm's own output, cut at that token


def test_branch_rows_rescue_and_stay_lossless_with_the_shipped_adapter(base, monkeypatch):
    """Branch rows with the shipped gated adapter (its second guesses are often the base's token): the output is
    mlx_lm's on the base, rescues happen, and every draft a branch row made passes (greedy, float32: it is the
    base's own next token after the verifier's)."""
    from mlx_sbd.drafting import Drafter

    _, lm, tokenizer = base
    model, tok = mlx_sbd.load()
    seen, real = [], Drafter.record
    monkeypatch.setattr(Drafter, "record", lambda self, source, m, a: (seen.append((source, m, a)),
                                                                       real(self, source, m, a))[1])
    rescued = 0
    for prompt in PROMPTS:
        ids = encode_prompt(tok, prompt)
        got, last = [], None
        for last in mlx_sbd.stream_generate(model, tok, ids, max_tokens=N, draft="sbd", block_size=8,
                                            gamma=float("inf"), branch=3):
            got += last.tokens
        assert got == reference(lm, tokenizer, ids)
        rescued += last.rescued
    branch_drafts = [(m, a) for source, m, a in seen if source == "branch"]
    assert rescued >= 5 and len(branch_drafts) >= rescued - len(PROMPTS)  # a rescue in a last forward has no next
    assert all(m == a == 1 for m, a in branch_drafts)


def test_the_shipped_corpus_drafts_the_base_and_stays_lossless(base):
    """The built-in adapter's draft corpus (the base's own answers to training prompts): with its drafts alone (prompt
    lookup of 8-grams only, which rarely matches) the output is mlx_lm's, and far more drafts pass than without it
    (measured: 94 against 25 on these four held-out prompts); the defaults (auto, every source) give mlx_lm's output
    too."""
    from mlx_sbd.drafting import PromptLookup
    from mlx_sbd.heldout import heldout_prompts

    _, lm, ref_tok = base
    model, tokenizer = mlx_sbd.load()
    assert model.corpus is not None and len(model.corpus) > 500_000
    prompts = [ids for kind in heldout_prompts(tokenizer, 2, kinds=("chat", "code")).values() for ids in kind]
    accepted = {True: 0, False: 0}
    for ids in prompts:
        want = reference(lm, ref_tok, ids)
        for use in (True, False):
            got, steps = verified(model, tokenizer, ids, max_tokens=N, draft="lookup", lookup=PromptLookup(8, 8),
                                  corpus=None if use else False)
            assert got == want
            accepted[use] += steps[-1].accepted
        assert verified(model, tokenizer, ids, max_tokens=N)[0] == want
    assert accepted[True] >= accepted[False] + 40, accepted
