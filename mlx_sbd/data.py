"""Training data: jsonl folders in mlx_lm's formats -> token sequences with a prompt offset.

A data folder holds train.jsonl (required) and optional valid.jsonl / test.jsonl, one JSON object per line in
one of mlx_lm's formats: {"text"}, {"prompt", "completion"}, {"messages"}. Unlike mlx_lm (whose first line sets
the format of the file), each line may use its own format, so plain text can be mixed into instruction data;
with `mask_prompt`, lines without a prompt ({"text"}) are trained on whole. Every line is checked before any
training starts; a bad line raises SBDError naming the file and line number.

With a chat template the sequence is built exactly as mlx_lm builds it (mlx_lm.tuner.datasets); without one
(e.g. a base model or the tiny char-level models) prompt and completion are concatenated as plain text, the
same way `mlx_sbd.generate` feeds a prompt when no chat template is applied. Each sequence ends with EOS.
The offset is the number of leading prompt tokens; with `mask_prompt` they get no loss (see batches.py).
"""

import gzip
import json
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import List, Tuple

from mlx_lm.tuner.datasets import create_dataset

from .errors import SBDError

Sequence = Tuple[List[int], int]  # (token ids ending in EOS, number of prompt tokens excluded from the loss)
FORMATS = (("prompt", "completion"), ("messages",), ("text",))  # checked in this order, like mlx_lm


def load_dataset(folder, tokenizer, max_seq_length: int, mask_prompt: bool = False):
    """(train, valid, test) lists of Sequence; valid/test are [] when their file is absent."""
    folder = Path(folder)
    if not folder.is_dir():
        raise SBDError(f"data folder not found: {folder} (expected a folder with train.jsonl)")
    if not (folder / "train.jsonl").is_file():
        raise SBDError(f"{folder} has no train.jsonl; put the training examples there, one JSON object per line")
    splits = []
    for name in ("train", "valid", "test"):
        path = folder / f"{name}.jsonl"
        splits.append(load_split(path, tokenizer, max_seq_length, mask_prompt) if path.is_file() else [])
    return tuple(splits)


def load_split(path: Path, tokenizer, max_seq_length: int, mask_prompt: bool = False) -> List[Sequence]:
    rows = read_jsonl(path)
    fmts = [data_format(row, path, line) for line, row in rows]
    if mask_prompt and all(fmt == ("text",) for fmt in fmts):  # as mlx_lm: there is no prompt to mask
        raise SBDError(f"{path}: --mask-prompt needs prompt/completion or messages data, not text only")
    seqs = [encode(row, fmt, tokenizer, mask_prompt, path, line) for (line, row), fmt in zip(rows, fmts)]
    too_long = sum(len(s) > max_seq_length for s, _ in seqs)
    if too_long:
        warnings.warn(
            f"{too_long} of {len(seqs)} sequences in {path} are longer than max_seq_length={max_seq_length} "
            "tokens and are truncated; raise --max-seq-length or split them",
            stacklevel=2,
        )
    return [(s[:max_seq_length], min(off, max_seq_length)) for s, off in seqs]


def read_jsonl(path: Path) -> List[Tuple[int, dict]]:
    """[(line number, object)], skipping blank lines; any malformed line is an SBDError naming it. A path ending in
    .gz is read through gzip."""
    rows = []
    with (gzip.open if str(path).endswith(".gz") else open)(path, "rb") as f:
        for line_no, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise SBDError(f"{path}:{line_no}: not UTF-8 text (byte 0x{raw[e.start]:02x} at column {e.start + 1}); "
                               "save the file as UTF-8") from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise SBDError(f"{path}:{line_no}: invalid JSON ({e.msg}); fix or remove this line") from None
            if not isinstance(obj, dict):
                raise SBDError(f"{path}:{line_no}: expected a JSON object, got {type(obj).__name__}")
            rows.append((line_no, obj))
    if not rows:
        raise SBDError(f"{path} is empty; add examples or delete the file")
    return rows


def data_format(obj: dict, path: Path, line_no: int) -> Tuple[str, ...]:
    for keys in FORMATS:
        if all(k in obj for k in keys):
            return keys
    if "prompt" in obj or "completion" in obj:
        raise SBDError(f"{path}:{line_no}: missing key '{'completion' if 'prompt' in obj else 'prompt'}' "
                       "(prompt and completion go together)")
    raise SBDError(
        f"{path}:{line_no}: no 'text', 'prompt'+'completion' or 'messages' key (found {sorted(obj)}); "
        "see mlx_lm's LORA.md data formats"
    )


def encode(obj: dict, fmt, tokenizer, mask_prompt: bool, path: Path, line_no: int) -> Sequence:
    if fmt == ("messages",) and not (isinstance(obj["messages"], list) and obj["messages"]):
        raise SBDError(f"{path}:{line_no}: 'messages' must be a non-empty list of {{role, content}} objects")
    if fmt == ("messages",):
        for i, message in enumerate(obj["messages"], 1):
            problem = message_problem(message)
            if problem:
                raise SBDError(f"{path}:{line_no}: message {i} {problem}; each message is "
                               '{"role": "...", "content": "..."} with string values')
    if fmt != ("messages",) and not all(isinstance(obj[k], str) for k in fmt):
        raise SBDError(f"{path}:{line_no}: {', '.join(fmt)} must be strings")
    if getattr(tokenizer, "has_chat_template", False) and fmt != ("text",):
        config = SimpleNamespace(mask_prompt=mask_prompt)
        tokens, offset = create_dataset([obj], tokenizer, config).process(obj)
        tokens = list(tokens)
    elif fmt == ("messages",):
        raise SBDError(f"{path}:{line_no}: 'messages' data needs a tokenizer with a chat template")
    else:
        # Encoded as mlx_lm encodes a plain prompt (tokenizer defaults), so training matches decoding.
        prompt = obj["prompt"] if fmt != ("text",) else ""
        text = prompt + obj["completion"] if fmt != ("text",) else obj["text"]
        tokens = tokenizer.encode(text)
        offset = len(tokenizer.encode(prompt)) if (mask_prompt and prompt) else 0
    if not tokens:
        raise SBDError(f"{path}:{line_no}: the example encodes to no tokens")
    if tokens[-1] != tokenizer.eos_token_id:
        tokens.append(tokenizer.eos_token_id)
    return tokens, offset


def message_problem(message) -> str:
    """Why a chat message cannot be trained on ('' when it can): chat templates index role and content as text."""
    if not isinstance(message, dict):
        return f"is not an object ({type(message).__name__})"
    if message.get("content") is None and "tool_calls" in message:  # an assistant's tool call (mlx_lm's format)
        return "" if isinstance(message.get("role"), str) else "has no string 'role'"
    for key in ("role", "content"):
        if key not in message:
            return f"has no '{key}'"
        if not isinstance(message[key], str):
            return f"has a non-string '{key}' ({type(message[key]).__name__})"
    return ""
