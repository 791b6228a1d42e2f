"""Self-distillation data: the base model's own greedy answers to built-in prompts about the standard library.

A verified drafter is right when it guesses the base's next token, and the base's own answers are the text it will
be asked to draft (VERIFIED_SBD.md §2). The prompts are offline and real: questions about the train split's
modules (stdlib_text.chat_prompts, with the chat template) and code completions of their functions' headers and
docstrings (stdlib_text.code_prompts, plain text: the held-out code prompts' kind, mlx_sbd.heldout), and general
chat questions far from the library (general_prompts: stories, recipes, science), so the drafter is not trained on
one subject alone. The test modules and test topics are never used, so held-out measurements stay held out.

Answers come from mlx_lm's `batch_generate` (greedy), written chunk by chunk, so that an interrupted run keeps what
it made and the same call continues it. The prompts are written first to <folder>/prompts.jsonl and read back on
a rerun: answers made elsewhere (another Python, whose standard library splits into other modules) still follow
the split of the machine that wrote the prompts. Rows: chat answers as {"messages"}, completions as {"text"}
(prompt + answer, decoded without the chat template, as the held-out code prompts are).

Used by `mlx-sbd train --data self` (train.self_data) and scripts/make_distill_data.py.
"""

import json
import os
import random
from pathlib import Path
from typing import Dict, List

from tqdm import tqdm

from .general_prompts import general_prompts
from .stdlib_text import chat_prompts, code_prompts, split_modules

PROMPTS = "prompts.jsonl"
# `--data self`: chat questions per split and code completions in train (valid gets min(code // 10, chat)).
SELF_ROWS = {"train": 512, "valid": 16}
SELF_CODE = 512
SELF_GENERAL = 512  # general chat questions in train (valid gets a tenth, at most its chat count)
MAX_TOKENS = 128  # per answer: the drafter learns the answers' openings, where the held-out prompts are decoded
BATCH_SIZE = 16  # prompts answered together (batch_generate: ~2x one at a time with OpenBLAS)


def split_prompts(path: Path, counts: Dict[str, int], n_code: int, seed: int,
                  n_general: int = 0) -> Dict[str, List[dict]]:
    """{split: [{"split", "kind", "prompt"}]}: counts[split] chat prompts about that split's modules, n_code code
    completion prompts of them and n_general general chat questions on that split's topics (general_prompts; kind
    "chat"); outside train a tenth as many code and general prompts, at most counts[split] each. Shuffled together;
    read from `path` when an earlier run wrote it."""
    path = Path(path)
    if path.is_file():
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        return {split: [r for r in rows if r["split"] == split] for split in counts}
    modules = split_modules(seed)
    out = {}
    for split, n in counts.items():
        chat = [{"kind": "chat", "prompt": p} for p in chat_prompts(modules[split], seed)[:n]]
        m = n_code if split == "train" else min(n_code // 10, n)
        code = [{"kind": "code", "prompt": p} for p in code_prompts(modules[split], m, seed)]
        g = n_general if split == "train" else min(n_general // 10, n)
        general = [{"kind": "chat", "prompt": p} for p in general_prompts(split, seed)[:g]] if g else []
        rows = chat + code + general
        if code or general:  # chat alone keeps chat_prompts' order
            random.Random(seed).shuffle(rows)
        out[split] = [{"split": split, **r} for r in rows]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text("".join(json.dumps(r) + "\n" for rows in out.values() for r in rows))
    os.replace(tmp, path)
    return out


def answer_row(prompt: dict, answer: str) -> dict:
    """A training row: the chat question and the base's answer, or a completion's prompt followed by its answer."""
    if prompt["kind"] == "chat":
        return {"messages": [{"role": "user", "content": prompt["prompt"]},
                             {"role": "assistant", "content": answer.strip()}]}
    return {"text": prompt["prompt"] + answer}


def answer_prompts(model, tokenizer, prompts: List[dict], path: Path, max_tokens: int = MAX_TOKENS,
                   batch_size: int = BATCH_SIZE, desc: str = "answers") -> None:
    """Append the base's greedy answers to prompts (answer_row per line) to `path`, continuing after the lines an
    earlier call wrote. `model` is an mlx_lm model or an SBDModel (its base)."""
    from mlx_lm import batch_generate

    from .generate import encode_prompt

    lm = getattr(model, "lm", model)
    path = Path(path)
    done = path.read_text().count("\n") if path.exists() else 0
    with open(path, "a") as f, tqdm(desc=desc, initial=done, total=len(prompts), unit="answer") as bar:
        for i in range(done, len(prompts), batch_size):
            chunk = prompts[i : i + batch_size]
            ids = [encode_prompt(tokenizer, p["prompt"], chat_template=p["kind"] == "chat") for p in chunk]
            answers = batch_generate(lm, tokenizer, ids, max_tokens=max_tokens).texts
            f.write("".join(json.dumps(answer_row(p, a)) + "\n" for p, a in zip(chunk, answers)))
            f.flush()  # a chunk is kept whole or not at all: a killed run loses at most the chunk in flight
            bar.update(len(chunk))


def write_self_set(folder, model, tokenizer, rows: Dict[str, int] = None, n_code: int = None,
                   max_tokens: int = None, batch_size: int = None, seed: int = 0,
                   n_general: int = None) -> Dict[str, int]:
    """A training folder of the base's own answers (train.jsonl, valid.jsonl), unless it is complete already;
    -> {split: rows}. Unset sizes are this module's SELF_ROWS, SELF_CODE, SELF_GENERAL, MAX_TOKENS, BATCH_SIZE. Answers go to
    <folder>/answers_<split>.jsonl as they are made and become <split>.jsonl when the split is done, so training
    never reads a half-answered split and a rerun continues the answers."""
    folder = Path(folder)
    rows = SELF_ROWS if rows is None else rows
    n_code = SELF_CODE if n_code is None else n_code
    n_general = SELF_GENERAL if n_general is None else n_general
    max_tokens = MAX_TOKENS if max_tokens is None else max_tokens
    batch_size = BATCH_SIZE if batch_size is None else batch_size
    prompts = split_prompts(folder / PROMPTS, rows, n_code, seed, n_general)
    counts = {}
    for split, todo in prompts.items():
        final = folder / f"{split}.jsonl"
        if not final.is_file():
            partial = folder / f"answers_{split}.jsonl"
            answer_prompts(model, tokenizer, todo, partial, max_tokens, batch_size, desc=f"self-distillation ({split})")
            os.replace(partial, final)
        counts[split] = final.read_text().count("\n")
    return counts
