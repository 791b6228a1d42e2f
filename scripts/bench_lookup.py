"""Prompt-lookup drafts against mlx_lm.generate, on tasks whose answers copy from the prompt, and on plain chat.

Tasks are built from real text on disk (the Python standard library this interpreter runs on):
  typehints  "Rewrite this function with type hints": functions of standard-library modules
  bugfix     "Fix the bug in this function": the same kind of function with one operator changed
  passage    "Answer from this passage": paragraphs of the Python language reference (pydoc_data.topics)
  chat       plain questions (stdlib_text's held-out prompts), where lookup finds little
Rows, all greedy on the same base weights (so every output must equal mlx_lm's; the script counts it):
  mlx_lm     mlx_lm.stream_generate on the base loaded by mlx_lm itself (the baseline)
  ntp        mlx-sbd one token per forward (draft none)
  lookup     mlx-sbd verified decoding with prompt-lookup drafts, no adapter
  sbd        the gated SmolLM2 adapter's mask block
  both       the gated adapter's mask block, and lookup where the mask block has no valid drafts
  auto       the default without an adapter: lookup drafts sized per forward from time(rows) and acceptance
  auto+adapter  the default with the gated adapter: auto may also choose the mask block
Rounds are interleaved (every method on every prompt each round, method order rotated): the table gives tokens per
forward, tokens/s summed over a task's prompts, and the ratio to mlx_lm in the same round (median and range).

    python scripts/bench_lookup.py --rounds 3
    python scripts/bench_lookup.py --sweep            # lookup sizes on development prompts (not the table's)
"""

import inspect
import random
import statistics
import sys
import time
from pathlib import Path

import click
import mlx.core as mx
import mlx_lm
from mlx_lm.generate import stream_generate as mlx_lm_stream_generate
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, save  # noqa: E402
from mlx_sbd.stdlib_text import chat_prompts, split_modules  # noqa: E402

import mlx_sbd  # noqa: E402
from mlx_sbd.drafting import PromptLookup  # noqa: E402
from mlx_sbd.generate import encode_prompt  # noqa: E402
from mlx_sbd.loading import resolve  # noqa: E402

GATED = Path(mlx_sbd.__file__).parent / "adapters" / "smollm2-135m-instruct-sbd-gated"
# Development modules (the sweep) and test modules (the table) do not overlap.
DEV_MODULES = ["textwrap", "fnmatch", "colorsys", "shlex"]
TEST_MODULES = ["heapq", "bisect", "statistics", "calendar", "posixpath", "glob"]
BUGS = [(" < ", " <= "), (" + 1", " - 1"), (" == ", " != "), (" > ", " >= "), (" and ", " or "), ("[0]", "[1]")]


def functions(modules, rng, n, lo=200, hi=900):
    """Source of n module-level functions of `modules` whose source is lo..hi characters."""
    import importlib

    found = []
    for name in modules:
        mod = importlib.import_module(name)
        for fname, f in sorted(vars(mod).items()):
            if inspect.isfunction(f) and f.__module__ == name and not fname.startswith("_"):
                try:
                    src = inspect.getsource(f)
                except (OSError, TypeError):
                    continue
                if lo <= len(src) <= hi and "\t" not in src:
                    found.append(src.rstrip())
    rng.shuffle(found)
    return found[:n]


def passages(split, n):
    """Prose paragraphs of the Python documentation that ships with the interpreter (pydoc's topics: the language
    reference), one per topic; development and test topics alternate."""
    from pydoc_data.topics import topics

    out = []
    for i, key in enumerate(sorted(topics)):
        if (i % 2 == 0) != (split == "dev"):
            continue
        paras = [" ".join(p.split()) for p in topics[key].split("\n\n")]
        paras = [p for p in paras if 300 <= len(p) <= 900 and p.count("(") < 6 and not p.startswith(("*", "-"))]
        if paras:
            out.append(paras[0])
    return out[:: max(1, len(out) // n)][:n]


def tasks(split: str, n: int, seed: int = 0) -> dict:
    rng = random.Random(seed)
    mods = DEV_MODULES if split == "dev" else TEST_MODULES
    funcs = functions(mods, rng, 2 * n)
    typehints = [f"Rewrite this function with type hints. Reply with the code only.\n\n```python\n{src}\n```"
                 for src in funcs[:n]]
    bugfix = []
    for src in funcs[n:]:
        old, new = next(((o, w) for o, w in BUGS if o in src), (None, None))
        if old is not None:
            bugfix.append("Fix the bug in this function. Reply with the corrected code only.\n\n"
                          f"```python\n{src.replace(old, new, 1)}\n```")
    passage = [f"Answer from this passage.\n\nPassage: {p}\n\nQuestion: What does the passage describe? Answer "
               "using its own words." for p in passages(split, n)]
    chat = chat_prompts(split_modules(0)["test" if split == "test" else "valid"], 0)[:n]
    return {"typehints": typehints, "bugfix": bugfix[:n], "passage": passage, "chat": chat}


def run_mlx_lm(lm, tokenizer, ids, n):
    out, last = [], None
    for last in mlx_lm_stream_generate(lm, tokenizer, mx.array(ids), max_tokens=n):
        out.append(last.token)
    out = out[:-1] if out and out[-1] in tokenizer.eos_token_ids else out
    return out, len(out), last.generation_tps, len(out)


def run_ours(model, tokenizer, ids, n, **kw):
    out, last = [], None
    for last in mlx_sbd.stream_generate(model, tokenizer, ids, max_tokens=n, **kw):
        out += last.tokens
    return out, last.nfe, last.generation_tps, last.generation_tokens


@click.command()
@click.option("--rounds", default=3, show_default=True)
@click.option("--prompts", "n_prompts", default=4, show_default=True, help="Prompts per task.")
@click.option("--max-tokens", default=128, show_default=True)
@click.option("--sweep", is_flag=True, help="Sweep lookup n-gram sizes and draft length on development prompts.")
@click.option("--tasks", "only_tasks", default=None, help="Comma-separated subset of typehints,bugfix,passage,chat.")
@click.option("--methods", "only_methods", default=None, help="Comma-separated subset of the rows (mlx_lm always runs).")
@click.option("--out", default=None, help="JSON path (default results/bench_lookup[_sweep].json).")
def main(rounds, n_prompts, max_tokens, sweep, only_tasks, only_methods, out):
    out = out or f"results/bench_lookup{'_sweep' if sweep else ''}.json"
    base_path = resolve(None)
    lm, ref_tok = mlx_lm.load(str(base_path))
    plain, tokenizer = mlx_sbd.load(adapter_path=False)
    split = "dev" if sweep else "test"
    by_task = tasks(split, n_prompts)
    if only_tasks:
        by_task = {t: by_task[t] for t in only_tasks.split(",")}
    ids_by_task = {t: [encode_prompt(tokenizer, p) for p in ps] for t, ps in by_task.items()}

    if sweep:
        methods = {"mlx_lm": lambda ids: run_mlx_lm(lm, ref_tok, ids, max_tokens)}
        for draft, (max_n, min_n, length) in [("lookup", c) for c in [(3, 1, 4), (3, 1, 6), (3, 1, 8), (3, 1, 12),
                                                                       (3, 2, 6), (4, 1, 8), (2, 1, 6)]] + \
                                              [("auto", c) for c in [(3, 1, 6), (3, 1, 12), (4, 1, 12)]]:
            methods[f"{draft} n{min_n}-{max_n} d{length}"] = (
                lambda ids, a=max_n, b=min_n, c=length, d=draft: run_ours(plain, tokenizer, ids, max_tokens, draft=d,
                                                                          lookup=PromptLookup(a, b, c)))
    else:
        gated, _ = mlx_sbd.load(adapter_path=GATED)
        methods = {
            "mlx_lm": lambda ids: run_mlx_lm(lm, ref_tok, ids, max_tokens),
            "ntp": lambda ids: run_ours(plain, tokenizer, ids, max_tokens, draft="none"),
            "lookup": lambda ids: run_ours(plain, tokenizer, ids, max_tokens, draft="lookup"),
            "sbd": lambda ids: run_ours(gated, tokenizer, ids, max_tokens, draft="sbd"),
            "both": lambda ids: run_ours(gated, tokenizer, ids, max_tokens, draft="both"),
            "auto": lambda ids: run_ours(plain, tokenizer, ids, max_tokens, draft="auto"),
            "auto+adapter": lambda ids: run_ours(gated, tokenizer, ids, max_tokens, draft="auto"),
        }
    if only_methods:
        methods = {m: f for m, f in methods.items() if m == "mlx_lm" or m in only_methods.split(",")}
    names = list(methods)
    for ids in next(iter(ids_by_task.values()))[:1]:  # warm-up: first-call compilation and allocation
        for name in names[:2]:
            methods[name](ids)

    # raw[task][method][round] = [tokens, forwards, seconds]; outputs[task][method] = outputs of the last round
    raw = {t: {m: [[0, 0, 0.0] for _ in range(rounds)] for m in names} for t in by_task}
    identical = {m: 0 for m in names}
    total = 0
    jobs = [(r, t, i) for r in range(rounds) for t in by_task for i in range(len(ids_by_task[t]))]
    for r, t, i in tqdm(jobs, desc="decoding"):
        ids = ids_by_task[t][i]
        order = names[r % len(names):] + names[: r % len(names)]
        outs = {}
        for name in order:
            toks, nfe, tps, n = methods[name](ids)
            cell = raw[t][name][r]
            cell[0], cell[1], cell[2] = cell[0] + n, cell[1] + nfe, cell[2] + n / max(tps, 1e-9)
            outs[name] = toks
        if r == 0:
            total += 1
            for name in names:
                identical[name] += outs[name] == outs["mlx_lm"]

    rows = []
    for t in by_task:
        for name in names:
            cells = raw[t][name]
            tps = [c[0] / c[2] for c in cells]
            ratio = [c[0] / c[2] / (b[0] / b[2]) for c, b in zip(cells, raw[t]["mlx_lm"])]
            rows.append(dict(task=t, method=name, tokens_per_forward=cells[0][0] / max(cells[0][1], 1),
                             tps=statistics.median(tps), ratio=statistics.median(ratio), ratio_lo=min(ratio),
                             ratio_hi=max(ratio)))
    print(f"\n{'task':10} {'method':22} {'tok/fwd':>8} {'tok/s':>8} {'x mlx_lm (range)':>22}")
    for row in rows:
        print(f"{row['task']:10} {row['method']:22} {row['tokens_per_forward']:8.2f} {row['tps']:8.1f} "
              f"{row['ratio']:8.3f} ({row['ratio_lo']:.3f}-{row['ratio_hi']:.3f})")
    print("identical to mlx_lm: " + ", ".join(f"{m} {identical[m]}/{total}" for m in names))
    save({"machine": machine(), "dtype": "float32", "max_tokens": max_tokens, "rounds": rounds, "split": split,
          "prompts": by_task, "rows": rows, "identical": identical, "total": total, "raw": raw}, out)


if __name__ == "__main__":
    main()
