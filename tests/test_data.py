"""Training data: mlx_lm's three formats, prompt offsets, truncation warning, and file:line errors."""

import json

import pytest

from mlx_sbd import load
from mlx_sbd.data import load_dataset
from mlx_sbd.errors import SBDError
from mlx_sbd.tiny import encode, make_tiny_model


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    folder = make_tiny_model(tmp_path_factory.mktemp("tiny"), hidden_size=32, num_hidden_layers=1,
                             num_attention_heads=2, num_key_value_heads=1, intermediate_size=64)
    return load(folder)[1]


CHAT_TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}:{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<s>assistant:{% endif %}")


def write(folder, name, lines):
    folder.mkdir(exist_ok=True)
    (folder / f"{name}.jsonl").write_text("\n".join(l if isinstance(l, str) else json.dumps(l) for l in lines) + "\n")
    return folder


def test_prompt_completion_and_text(tmp_path, tokenizer):
    eos = tokenizer.eos_token_id
    data = write(tmp_path / "d", "train", [{"prompt": "ab=", "completion": "ba"}, {"prompt": "x=", "completion": "yz"}])
    write(data, "valid", [{"prompt": "q=", "completion": "r"}])
    train, valid, test = load_dataset(data, tokenizer, max_seq_length=100, mask_prompt=True)
    assert train == [(list(encode(tokenizer, "ab=ba")) + [eos], 3), (list(encode(tokenizer, "x=yz")) + [eos], 2)]
    assert valid == [(list(encode(tokenizer, "q=r")) + [eos], 2)] and test == []
    train, _, _ = load_dataset(data, tokenizer, max_seq_length=100, mask_prompt=False)
    assert [o for _, o in train] == [0, 0]
    text = write(tmp_path / "t", "train", [{"text": "hello"}])
    assert load_dataset(text, tokenizer, 100)[0] == [(list(encode(tokenizer, "hello")) + [eos], 0)]
    with pytest.raises(SBDError, match="--mask-prompt needs prompt/completion"):
        load_dataset(text, tokenizer, 100, mask_prompt=True)


def test_formats_mix_line_by_line(tmp_path, tokenizer):
    """Text lines mixed into prompt/completion data under a chat template: each line is encoded as mlx_lm's
    TextDataset / CompletionsDataset encode a file of that format (plus the closing EOS), and --mask-prompt leaves
    text lines whole."""
    from mlx_lm.tuner.datasets import CompletionsDataset, TextDataset

    rows = [{"prompt": "ab", "completion": "ba"}, {"text": "hello"}, {"prompt": "xy", "completion": "yx"}]
    data = write(tmp_path / "d", "train", rows)
    tokenizer._tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.has_chat_template = True
    try:
        train, _, _ = load_dataset(data, tokenizer, max_seq_length=100, mask_prompt=True)
        refs = [CompletionsDataset([r], tokenizer, "prompt", "completion", mask_prompt=True) if "prompt" in r
                else TextDataset([r], tokenizer) for r in rows]
        expected = [(list(t), o) for t, o in (ref.process(r) for ref, r in zip(refs, rows))]
    finally:
        tokenizer._tokenizer.chat_template = None
        tokenizer.has_chat_template = False
    eos = tokenizer.eos_token_id
    expected = [(t if t[-1] == eos else t + [eos], o) for t, o in expected]  # every sequence ends with EOS
    assert train == expected
    assert train[1][1] == 0 and train[0][1] > 0


def test_truncation_warns(tmp_path, tokenizer):
    data = write(tmp_path / "d", "train", [{"text": "abcdefghij"}, {"text": "ab"}])
    with pytest.warns(UserWarning, match="1 of 2 sequences .* truncated"):
        train, _, _ = load_dataset(data, tokenizer, max_seq_length=4)
    assert [len(s) for s, _ in train] == [4, 3]


@pytest.mark.parametrize(
    "lines, message",
    [
        (['{"text": "ok"}', '{"text": "bad"'], r"train.jsonl:2: invalid JSON"),
        (['{"prompt": "a", "completion": "b"}', "", '{"prompt": "a"}'], r"train.jsonl:3: missing key"),
        (['{"foo": 1}'], r"train.jsonl:1: no 'text'"),
        (['[1, 2]'], r"train.jsonl:1: expected a JSON object"),
        (['{"text": 5}'], r"train.jsonl:1: text must be strings"),
        ([""], r"train.jsonl is empty"),
        (['{"messages": [{"role": "user", "content": "hi"}]}'], r"train.jsonl:1: 'messages' data needs a tokenizer"),
    ],
)
def test_malformed_input_names_file_and_line(tmp_path, tokenizer, lines, message):
    data = write(tmp_path / "d", "train", lines)
    with pytest.raises(SBDError, match=message):
        load_dataset(data, tokenizer, max_seq_length=100)


def test_missing_folder_or_train_file(tmp_path, tokenizer):
    with pytest.raises(SBDError, match="data folder not found"):
        load_dataset(tmp_path / "nope", tokenizer, 100)
    (tmp_path / "empty").mkdir()
    with pytest.raises(SBDError, match="has no train.jsonl"):
        load_dataset(tmp_path / "empty", tokenizer, 100)


def test_chat_template_as_mlx_lm(tmp_path, tokenizer):
    """With a chat template, sequences and prompt offsets are mlx_lm's own (CompletionsDataset/ChatDataset)."""
    from mlx_lm.tuner.datasets import ChatDataset

    tokenizer._tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.has_chat_template = True
    try:
        msgs = [{"role": "user", "content": "ab"}, {"role": "assistant", "content": "ba"}]
        data = write(tmp_path / "d", "train", [{"messages": msgs}])
        train, _, _ = load_dataset(data, tokenizer, max_seq_length=100, mask_prompt=True)
        ref_tokens, ref_offset = ChatDataset([{"messages": msgs}], tokenizer, mask_prompt=True).process({"messages": msgs})
        assert train[0][1] == ref_offset
        assert train[0][0][: len(ref_tokens)] == list(ref_tokens)
    finally:
        tokenizer._tokenizer.chat_template = None
        tokenizer.has_chat_template = False


def test_non_utf8_line_names_file_and_line(tmp_path, tokenizer):
    data = tmp_path / "d"
    data.mkdir()
    (data / "train.jsonl").write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')  # Latin-1, not UTF-8
    with pytest.raises(SBDError, match=r"train.jsonl:2: not UTF-8 text \(byte 0xe9 at column 14\)"):
        load_dataset(data, tokenizer, max_seq_length=100)


@pytest.mark.parametrize("messages, problem", [
    ([{"role": "user"}], "message 1 has no 'content'"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": 5}], "message 2 has a non-string 'content' (int)"),
    ([{"role": "user", "content": [{"type": "text", "text": "a"}]}], "message 1 has a non-string 'content' (list)"),
    ([{"content": "a"}], "message 1 has no 'role'"),
    (["hi"], "message 1 is not an object (str)"),
])
def test_bad_chat_messages_name_file_and_line(tmp_path, tokenizer, messages, problem):
    tokenizer._tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.has_chat_template = True
    try:
        data = write(tmp_path / "d", "train", [{"text": "ok"}, {"messages": messages}])
        with pytest.raises(SBDError) as e:
            load_dataset(data, tokenizer, max_seq_length=100)
        assert str(e.value).startswith(f"{data / 'train.jsonl'}:2: {problem}"), str(e.value)
    finally:
        tokenizer._tokenizer.chat_template = None
        tokenizer.has_chat_template = False


def test_tool_call_message_without_content_is_kept(tmp_path, tokenizer):
    from mlx_sbd.data import message_problem

    assert message_problem({"role": "assistant", "content": None, "tool_calls": [{"function": {"name": "f"}}]}) == ""
    assert message_problem({"role": "assistant", "content": None}) == "has a non-string 'content' (NoneType)"
