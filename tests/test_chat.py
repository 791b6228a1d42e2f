"""`mlx-sbd chat` and ChatSession: answers equal fresh generations, and later turns prefill only the new tokens."""

import json

import pytest
from click.testing import CliRunner

import mlx_sbd
from mlx_sbd.chat import ChatSession
from mlx_sbd.cli import cli
from mlx_sbd.errors import SBDError
from mlx_sbd.generate import encode_prompt
from mlx_sbd.tiny import make_tiny_model

# Characters the char tokenizer knows, so the tiny model can chat (same template as test_server.py).
TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def tiny_folder(root, chat=True):
    folder = make_tiny_model(root, hidden_size=64, num_hidden_layers=2, intermediate_size=128, seed=3,
                             max_position_embeddings=512)
    if chat:
        path = folder / "tokenizer_config.json"
        path.write_text(json.dumps(dict(json.loads(path.read_text()), chat_template=TEMPLATE)))
    return folder


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tiny_folder(tmp_path_factory.mktemp("chat") / "m")


@pytest.fixture(scope="module")
def tiny(folder):
    return mlx_sbd.load(str(folder))


def answer(session, text):
    last, out = None, ""
    for last in session.ask(text):
        out += last.text
    return out, last


@pytest.mark.parametrize("block_size", [1, 4])
@pytest.mark.parametrize("verify", [True, False])
def test_turns_reuse_the_cache_and_equal_fresh_generation(tiny, block_size, verify):
    model, tokenizer = tiny
    settings = dict(max_tokens=10, block_size=block_size, verify=verify)
    session = ChatSession(model, tokenizer, system_prompt="be brief", **settings)
    a1, r1 = answer(session, "hello")
    assert session.cached_tokens == 0 and a1 == mlx_sbd.generate(model, tokenizer, session.messages[:-1], **settings)
    a2, r2 = answer(session, "and then?")
    conversation = session.messages[:-1]
    ids = encode_prompt(tokenizer, conversation)
    assert session.cached_tokens > len(encode_prompt(tokenizer, conversation[:2])) - block_size
    assert r2.prompt_tokens == len(ids) - session.cached_tokens  # only the new tokens were prefilled
    assert a2 == mlx_sbd.generate(model, tokenizer, conversation, **settings)
    assert [m["role"] for m in session.messages] == ["system", "user", "assistant", "user", "assistant"]


def test_an_interrupted_answer_is_kept_and_the_cache_rebuilt(tiny):
    model, tokenizer = tiny
    session = ChatSession(model, tokenizer, max_tokens=30)
    gen = session.ask("hello")
    first = next(gen).text
    gen.close()  # what Ctrl-C does
    assert session.messages[-1] == {"role": "assistant", "content": first}
    a2, _ = answer(session, "go on")
    assert session.cached_tokens == 0  # the cut-off cache was not trusted
    assert a2 == mlx_sbd.generate(model, tokenizer, session.messages[:-1], max_tokens=30)


def test_a_refused_turn_leaves_the_conversation_unchanged(tiny):
    model, tokenizer = tiny
    session = ChatSession(model, tokenizer, max_tokens=5)
    answer(session, "hi")
    before = list(session.messages)
    with pytest.raises(SBDError, match="context"):
        answer(session, "a" * 600)
    assert session.messages == before
    answer(session, "ok")  # still works
    session.reset()
    assert session.messages == [] and session.caches.entries == []


def test_a_model_without_a_chat_template_is_refused(tmp_path):
    model, tokenizer = mlx_sbd.load(str(tiny_folder(tmp_path / "plain", chat=False)))
    with pytest.raises(SBDError, match="chat template"):
        ChatSession(model, tokenizer)
    result = CliRunner().invoke(cli, ["chat", "--model", str(tmp_path / "plain")], input="hi\n")
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert [line for line in result.output.splitlines() if line.startswith("Error:")]


def test_chat_command(folder):
    lines = ["hello", "/stats", "and then?", "/reset", "h", "again", "q", "never read"]
    result = CliRunner().invoke(cli, ["chat", "--model", str(folder), "-m", "8", "-k", "4"], input="\n".join(lines))
    assert result.exit_code == 0, result.output
    out = result.output
    assert out.count("Forward passes:") == 2  # stats for the two answers after /stats, none before
    cached = [int(line.split(":")[1]) for line in out.splitlines() if line.startswith("Cached prompt tokens:")]
    assert cached[0] > 0 and cached[1] == 0  # turn 2 reused turn 1; after /reset nothing to reuse
    assert "[new conversation]" in out and "Commands:" in out


def test_chat_command_ends_on_eof(folder):
    result = CliRunner().invoke(cli, ["chat", "--model", str(folder), "-m", "4", "--stats"], input="hello\n")
    assert result.exit_code == 0 and result.output.count("Forward passes:") == 1


@pytest.mark.slow
def test_smollm2_chat_two_turns():
    """The built-in model with its shipped adapter: turn 2 reuses turn 1 and answers as a fresh generation."""
    model, tokenizer = mlx_sbd.load()
    session = ChatSession(model, tokenizer, max_tokens=24)
    answer(session, "Name a fruit.")
    a2, r2 = answer(session, "And a vegetable?")
    assert session.cached_tokens > 20 and r2.prompt_tokens < 20
    assert a2 == mlx_sbd.generate(model, tokenizer, session.messages[:-1], max_tokens=24)
