"""Synthetic prompt/completion tasks for training tests and benchmarks, deterministic by seed.

Tasks (each a function `(rng: random.Random, **settings) -> (prompt, completion)`):
  arithmetic  multi-digit addition (optionally subtraction) with the column steps written out, then the answer:
                prompt      "Q: 4821+379="
                completion  "1+9+0=10 2+7+1=10 8+3+1=12 4+0+1=05\\nA: 5200"
              One step per column, least significant first: "x+y+c=CD" (or "x-y-c=CD") where c is the carry
              (borrow) coming in, D the written digit and C the carry (borrow) going out, always two digits so
              every step has the same shape. Subtraction keeps a >= b. Each step depends on the previous
              carry: short-range dependencies, like reasoning text.
  reverse     reverse a random lowercase string:  prompt "R: abcde="  completion "edcba".
              Every completion character is a function of the prompt alone (no dependency between output
              positions), so a whole block is fully determined: the best case for parallel decoding, and a
              contrast to the carry chains of `arithmetic`.
Files are mlx_lm's {"prompt", "completion"} JSONL. Scoring is exact match on the whole completion, line by line
(see `exact_match`).
"""

import json
import random
import string
from pathlib import Path

from .errors import SBDError


def _column_steps(a: int, b: int, op: str) -> list[str]:
    """Written column addition/subtraction of a and b (a >= b for "-"), least significant column first."""
    xs, ys = str(a)[::-1], str(b)[::-1]
    carry, steps = 0, []
    for i in range(max(len(xs), len(ys))):
        x = int(xs[i]) if i < len(xs) else 0
        y = int(ys[i]) if i < len(ys) else 0
        if op == "+":
            total = x + y + carry
            out, digit = divmod(total, 10)
        else:
            total = x - y - carry
            out, digit = (1, total + 10) if total < 0 else (0, total)
        steps.append(f"{x}{op}{y}{op}{carry}={out}{digit}")
        carry = out
    return steps


def arithmetic(rng: random.Random, min_digits: int = 3, max_digits: int = 5, ops: str = "+") -> tuple[str, str]:
    """Each operand gets min_digits..max_digits digits (uniform); ops is "+", "-" or "+-"."""
    if not 1 <= min_digits <= max_digits:
        raise SBDError(f"need 1 <= min_digits <= max_digits, got {min_digits}, {max_digits}")
    if not ops or set(ops) - {"+", "-"}:
        raise SBDError(f"ops must be made of '+' and '-', got {ops!r}")

    def operand() -> int:
        n = rng.randint(min_digits, max_digits)
        return rng.randint(10 ** (n - 1) if n > 1 else 0, 10**n - 1)

    a, b, op = operand(), operand(), rng.choice(ops)
    if op == "-" and a < b:
        a, b = b, a
    answer = a + b if op == "+" else a - b
    return f"Q: {a}{op}{b}=", " ".join(_column_steps(a, b, op)) + f"\nA: {answer}"


def reverse(rng: random.Random, min_len: int = 24, max_len: int = 48) -> tuple[str, str]:
    """A lowercase string of min_len..max_len letters (uniform) and its reversal."""
    if not 1 <= min_len <= max_len:
        raise SBDError(f"need 1 <= min_len <= max_len, got {min_len}, {max_len}")
    text = "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(min_len, max_len)))
    return f"R: {text}=", text[::-1]


TASKS = {"arithmetic": arithmetic, "reverse": reverse}

_ALPHABETS = {
    "arithmetic": string.digits + "+-=: \nAQ",
    "reverse": string.ascii_lowercase + "=: R",
}


def _task(name: str):
    if name not in TASKS:
        raise SBDError(f"unknown task '{name}'; choose one of: {', '.join(TASKS)}")
    return TASKS[name]


def alphabet(task: str) -> str:
    """Every character the task's prompts and completions can contain, sorted (for a char-level tokenizer)."""
    _task(task)
    return "".join(sorted(set(_ALPHABETS[task])))


def make_examples(task: str, n: int, seed: int, **settings) -> list[dict]:
    """n examples with distinct prompts, [{"prompt", "completion"}], drawn from random.Random(seed).

    The first n of a larger request are the same n examples (draws are consumed in order), so splits taken
    as consecutive slices are disjoint by construction.
    """
    make = _task(task)
    rng = random.Random(seed)
    seen, examples = set(), []
    # Small settings (few digits, short strings) can run out of distinct prompts: give up after many repeats.
    for _ in range(20 * n + 1000):
        if len(examples) == n:
            break
        prompt, completion = make(rng, **settings)
        if prompt not in seen:
            seen.add(prompt)
            examples.append({"prompt": prompt, "completion": completion})
    if len(examples) < n:
        raise SBDError(f"task '{task}' with {settings or 'default settings'} has too few distinct prompts for "
                       f"{n} examples; ask for fewer or widen the settings")
    return examples


def write_dataset(folder, task: str, n_train: int, n_valid: int, n_test: int, seed: int, **settings) -> Path:
    """Write train.jsonl / valid.jsonl / test.jsonl (mlx_lm's prompt/completion format) with no prompt shared
    between splits. Returns the folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    examples = make_examples(task, n_train + n_valid + n_test, seed, **settings)
    bounds = {"train": (0, n_train), "valid": (n_train, n_train + n_valid),
              "test": (n_train + n_valid, n_train + n_valid + n_test)}
    for split, (lo, hi) in bounds.items():
        with open(folder / f"{split}.jsonl", "w") as f:
            for example in examples[lo:hi]:
                f.write(json.dumps(example) + "\n")
    return folder


def exact_match(prediction: str, completion: str) -> bool:
    """True when the prediction reproduces the whole reference completion (every step and the final answer).

    Lines are compared after stripping surrounding whitespace. Lines the prediction has beyond the
    reference's last line are ignored, so a model that keeps generating after the answer line (no EOS) is
    judged on the answer it gave; the answer line itself must match exactly ("5200" is not "52001").
    """
    ref = [line.strip() for line in completion.strip().split("\n")]
    pred = [line.strip() for line in prediction.strip().split("\n")]
    return pred[: len(ref)] == ref


def score(predictions: list[str], examples: list[dict]) -> float:
    """Fraction of predictions that exactly match their example's completion (see exact_match)."""
    if len(predictions) != len(examples) or not examples:
        raise SBDError(f"need one prediction per example, got {len(predictions)} for {len(examples)} examples")
    return sum(exact_match(p, e["completion"]) for p, e in zip(predictions, examples)) / len(examples)
