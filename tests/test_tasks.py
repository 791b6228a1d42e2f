"""Synthetic tasks: determinism, disjoint splits, arithmetic re-checked independently, and the scorer."""

import json
import random
import re

import pytest

from mlx_sbd.errors import SBDError
from mlx_sbd.tasks import TASKS, alphabet, exact_match, make_examples, score, write_dataset

STEP = re.compile(r"^(\d)([+-])(\d)\2([01])=([01])(\d)$")


def check_arithmetic(prompt, completion):
    """Re-derive the answer with Python ints and replay the written steps column by column."""
    m = re.fullmatch(r"Q: (\d+)([+-])(\d+)=", prompt)
    assert m, prompt
    a, op, b = int(m[1]), m[2], int(m[3])
    steps_line, answer_line = completion.split("\n")
    assert answer_line == f"A: {a + b if op == '+' else a - b}"
    steps = steps_line.split(" ")
    assert len(steps) == max(len(m[1]), len(m[3]))
    carry_in, digits = 0, []
    for col, step in enumerate(steps):
        s = STEP.match(step)
        assert s, step
        x, y, c, out, d = int(s[1]), int(s[3]), int(s[4]), int(s[5]), int(s[6])
        assert s[2] == op
        assert x == (a // 10**col) % 10 and y == (b // 10**col) % 10  # the right column's digits
        assert c == carry_in
        # out*10 + d is the column result: x + y + c for addition, x - y - c + 10*borrow for subtraction
        assert (x + y + c == 10 * out + d) if op == "+" else (x - y - c + 10 * out == d)
        carry_in = out
        digits.append(d)
    assert op == "+" or carry_in == 0  # a >= b: no borrow out of the top column
    written = int(str(carry_in) + "".join(map(str, reversed(digits))))
    assert written == (a + b if op == "+" else a - b)


@pytest.mark.parametrize("task", list(TASKS))
def test_deterministic_by_seed(task):
    assert make_examples(task, 50, seed=3) == make_examples(task, 50, seed=3)
    assert make_examples(task, 50, seed=3) != make_examples(task, 50, seed=4)
    assert make_examples(task, 80, seed=3)[:50] == make_examples(task, 50, seed=3)


def test_no_global_random_state_used():
    random.seed(0)
    first = make_examples("arithmetic", 20, seed=1)
    random.seed(12345)
    random.random()
    assert make_examples("arithmetic", 20, seed=1) == first


@pytest.mark.parametrize("ops", ["+", "-", "+-"])
@pytest.mark.parametrize("digits", [(1, 1), (1, 3), (3, 5), (6, 7)])
def test_arithmetic_steps_are_right(ops, digits):
    examples = make_examples("arithmetic", 50 if digits == (1, 1) else 300, seed=7,
                             min_digits=digits[0], max_digits=digits[1], ops=ops)
    for e in examples:
        check_arithmetic(e["prompt"], e["completion"])
    if ops == "+-":
        assert {"+", "-"} <= {c for e in examples for c in e["prompt"] if c in "+-"}


def test_arithmetic_worked_examples():
    from mlx_sbd.tasks import _column_steps

    assert " ".join(_column_steps(4821, 379, "+")) == "1+9+0=10 2+7+1=10 8+3+1=12 4+0+1=05"
    assert " ".join(_column_steps(5000, 4999, "-")) == "0-9-0=11 0-9-1=10 0-9-1=10 5-4-1=00"
    check_arithmetic("Q: 4821+379=", "1+9+0=10 2+7+1=10 8+3+1=12 4+0+1=05\nA: 5200")
    check_arithmetic("Q: 5000-4999=", "0-9-0=11 0-9-1=10 0-9-1=10 5-4-1=00\nA: 1")
    with pytest.raises(AssertionError):  # the checker itself rejects a wrong carry
        check_arithmetic("Q: 4821+379=", "1+9+0=10 2+7+0=09 8+3+1=12 4+0+1=05\nA: 5200")


def test_default_completion_lengths():
    for task in TASKS:
        lengths = [len(e["completion"]) for e in make_examples(task, 300, seed=0)]
        assert 20 <= min(lengths) and max(lengths) <= 80, (task, min(lengths), max(lengths))


def test_reverse_is_reversal():
    for e in make_examples("reverse", 200, seed=5, min_len=1, max_len=40):
        text = re.fullmatch(r"R: ([a-z]+)=", e["prompt"])[1]
        assert e["completion"] == "".join(text[i] for i in range(len(text) - 1, -1, -1))


@pytest.mark.parametrize("task", list(TASKS))
def test_alphabet_covers_everything(task):
    chars = set(alphabet(task))
    assert len(chars) == len(alphabet(task))
    for e in make_examples(task, 500, seed=11):
        assert set(e["prompt"] + e["completion"]) <= chars


def test_write_dataset_disjoint_splits(tmp_path):
    write_dataset(tmp_path / "data", "arithmetic", 200, 30, 40, seed=2, min_digits=2, max_digits=3, ops="+-")
    splits = {}
    for name, n in (("train", 200), ("valid", 30), ("test", 40)):
        lines = (tmp_path / "data" / f"{name}.jsonl").read_text().splitlines()
        rows = [json.loads(line) for line in lines]
        assert len(rows) == n and all(set(r) == {"prompt", "completion"} for r in rows)
        splits[name] = {r["prompt"] for r in rows}
        assert len(splits[name]) == n
    assert not splits["train"] & splits["valid"]
    assert not splits["train"] & splits["test"]
    assert not splits["valid"] & splits["test"]


def test_too_few_distinct_prompts_is_a_clear_error():
    # one-digit addition has 100 distinct prompts
    with pytest.raises(SBDError, match="distinct prompts"):
        make_examples("arithmetic", 101, seed=0, min_digits=1, max_digits=1, ops="+")
    assert len(make_examples("arithmetic", 100, seed=0, min_digits=1, max_digits=1, ops="+")) == 100


def test_bad_task_and_settings():
    with pytest.raises(SBDError, match="arithmetic, reverse"):
        make_examples("bogus", 3, seed=0)
    with pytest.raises(SBDError):
        alphabet("bogus")
    with pytest.raises(SBDError):
        make_examples("arithmetic", 3, seed=0, ops="*")
    with pytest.raises(SBDError):
        make_examples("arithmetic", 3, seed=0, min_digits=4, max_digits=2)


def test_scorer_accepts_reference_and_rejects_corruptions():
    examples = make_examples("arithmetic", 20, seed=9) + make_examples("reverse", 20, seed=9)
    refs = [e["completion"] for e in examples]
    assert score(refs, examples) == 1.0
    assert score([f"  {r}\n" for r in refs], examples) == 1.0  # surrounding whitespace is ignored
    assert score([r + "\nQ: 1+1=" for r in refs], examples) == 1.0  # text after the answer line is ignored

    def wrong_last_digit(r):
        return r[:-1] + str((int(r[-1]) + 1) % 10) if r[-1].isdigit() else r[:-1] + ("a" if r[-1] != "a" else "b")

    assert score([wrong_last_digit(r) for r in refs], examples) == 0.0
    assert score([r + "1" for r in refs], examples) == 0.0  # a longer answer is wrong
    assert score([r[:-1] for r in refs], examples) == 0.0  # a truncated answer is wrong
    # a wrong step with the right final answer still fails: the whole completion is checked
    arith = [e for e in examples if e["prompt"].startswith("Q:")]
    assert not exact_match("9" + arith[0]["completion"][1:], arith[0]["completion"])
    half = [r if i % 2 else wrong_last_digit(r) for i, r in enumerate(refs)]
    assert score(half, examples) == 0.5
    with pytest.raises(SBDError):
        score(refs[:-1], examples)
