"""Self-distillation data for an SBD adapter of the built-in SmolLM2: the base model's own greedy answers.

Prompts are built from real text available offline, the docstrings of the Python standard library, with a few
instruction templates; modules are split between train/valid/test so that test prompts are about modules never
seen in training. Answers come from the base model with greedy decoding (mlx_lm.batch_generate, ~2x the
throughput of one prompt at a time with OpenBLAS), written chunk by chunk so that an interrupted run keeps what it
made: rerun the same command to continue. Fine-tuning on the model's own answers keeps its behaviour while it
learns to predict blocks of its own future tokens. <out>/mix is the folder to train on: the distilled rows plus
synthetic task rows (mlx_sbd.tasks) and, with --n-text, plain-text rows of documentation (docstrings of the
train/valid modules, never the test modules'), which keep ordinary text in the objective; shuffled.

    python scripts/make_distill_data.py --out data/smollm2-distill --n-train 320 --n-valid 24 --n-test 40
"""

import importlib
import inspect
import json
import random
import sys
import warnings
from pathlib import Path

import click
from mlx_lm import batch_generate
from tqdm import tqdm

import mlx_sbd
from mlx_sbd.generate import encode_prompt
from mlx_sbd.tasks import make_examples

SKIP = {"antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo", "lib2to3", "ensurepip", "venv",
        "pydoc_data", "__main__", "xxsubtype", "msilib", "winreg", "winsound", "_msi", "webbrowser", "pty"}

TEMPLATES = [
    "Explain in simple words what this Python function does:\n\n{name}{sig}\n{doc}",
    "Summarize the following documentation in two or three sentences:\n\n{doc}",
    "Write a short Python example that uses `{name}` and explain it.",
    "What would a beginner need to know about `{name}` in Python? Documentation:\n\n{doc}",
]
MODULE_TEMPLATES = [
    "What is the Python standard library module `{mod}` used for?\n\n{doc}",
    "Give me three practical use cases for Python's `{mod}` module.",
]


def first_paragraph(doc: str, limit: int = 320) -> str:
    para = inspect.cleandoc(doc).split("\n\n")[0].strip()
    return para[:limit]


def documented(mod_name: str):
    """(module, [(name, callable, docstring)] of its public callables defined there), or None when the module
    cannot be imported here. Importing deprecated modules, and reading their docs, warns: silenced."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            mod = importlib.import_module(mod_name)
        except Exception:
            return None
        return mod, [(name, obj, inspect.getdoc(obj)) for name, obj in sorted(vars(mod).items())
                     if not name.startswith("_") and callable(obj) and getattr(obj, "__module__", None) == mod_name]


def module_prompts(mod_name: str):
    """Prompts from one stdlib module: its docstring and its public functions' docstrings."""
    found = documented(mod_name)
    if found is None:
        return []
    mod, callables = found
    out = []
    if mod.__doc__ and len(mod.__doc__) > 40:
        out += [t.format(mod=mod_name, doc=first_paragraph(mod.__doc__)) for t in MODULE_TEMPLATES]
    for name, obj, doc in callables:
        if not doc or len(doc) < 40:
            continue
        try:
            sig = str(inspect.signature(obj))
        except (TypeError, ValueError):
            sig = "(...)"
        out.append((f"{mod_name}.{name}", sig, first_paragraph(doc)))
    return out


def doc_texts(modules: list, n: int, rng: random.Random, limit: int = 1200) -> list:
    """Up to n plain-text rows: whole docstrings (cut at a paragraph break before `limit` characters) of the
    modules and of their public callables, in a seeded random order."""
    texts = []
    for mod_name in modules:
        found = documented(mod_name)
        if found is None:
            continue
        mod, callables = found
        for doc in [inspect.getdoc(mod)] + [doc for _, _, doc in callables]:
            if not doc or len(doc) < 200:
                continue
            cut = doc[:limit]
            if len(doc) > limit and "\n\n" in cut:
                cut = cut[: cut.rindex("\n\n")]
            texts.append(cut.strip())
    rng.shuffle(texts)
    return [{"text": t} for t in texts[:n]]


def split_modules(rng: random.Random) -> dict:
    """{split: [stdlib module name]}: modules split 80/10/10 by a seeded shuffle."""
    names = sorted(n for n in sys.stdlib_module_names if not n.startswith("_") and n not in SKIP)
    rng.shuffle(names)
    cut1, cut2 = int(0.8 * len(names)), int(0.9 * len(names))
    return {"train": names[:cut1], "valid": names[cut1:cut2], "test": names[cut2:]}


def build_prompts(seed: int):
    """{split: [prompt]}; test prompts are about modules never seen in train or valid."""
    rng = random.Random(seed)
    prompts = {}
    for split, mods in split_modules(rng).items():
        items = []
        for m in mods:
            for p in module_prompts(m):
                if isinstance(p, str):
                    items.append(p)
                else:
                    name, sig, doc = p
                    items.append(rng.choice(TEMPLATES).format(name=name, sig=sig, doc=doc))
        rng.shuffle(items)
        prompts[split] = items
    return prompts


@click.command()
@click.option("--out", default="data/smollm2-distill", show_default=True)
@click.option("--n-train", default=320, show_default=True)
@click.option("--n-valid", default=24, show_default=True)
@click.option("--n-test", default=40, show_default=True)
@click.option("--n-synthetic", default=100, show_default=True, help="Synthetic task examples added to train (1/10 to valid).")
@click.option("--n-text", default=0, show_default=True, help="Plain documentation-text rows added to train (1/10 to valid).")
@click.option("--max-tokens", default=128, show_default=True)
@click.option("--seed", default=0, show_default=True)
@click.option("--batch-size", default=16, show_default=True, help="Prompts answered together by mlx_lm.batch_generate.")
def main(out, n_train, n_valid, n_test, n_synthetic, n_text, max_tokens, seed, batch_size):
    model, tokenizer = mlx_sbd.load(adapter_path=False)  # the base model's own answers
    prompts = build_prompts(seed)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for split, n in {"test": n_test, "valid": n_valid, "train": n_train}.items():
        path = out / f"{split}.jsonl"
        done = path.read_text().count("\n") if path.exists() else 0  # resume a stopped run
        todo = prompts[split][done:n]
        with open(path, "a") as f, tqdm(desc=f"{split} answers", initial=done, total=n) as bar:
            for i in range(0, len(todo), batch_size):
                chunk = todo[i : i + batch_size]
                ids = [encode_prompt(tokenizer, p) for p in chunk]
                answers = batch_generate(model.lm, tokenizer, ids, max_tokens=max_tokens).texts
                for p, answer in zip(chunk, answers):
                    row = {"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": answer.strip()}]}
                    f.write(json.dumps(row) + "\n")
                f.flush()
                bar.update(len(chunk))
        print(f"{split}: {n} distilled rows -> {path}")
    # The folder to train on: distilled rows plus synthetic task and text rows (1/10 as many in valid), shuffled.
    mix = out / "mix"
    mix.mkdir(exist_ok=True)
    modules = split_modules(random.Random(seed))
    rng = random.Random(seed)
    for split in ("train", "valid", "test"):
        lines = (out / f"{split}.jsonl").read_text().splitlines()
        if split != "test":
            count = n_synthetic if split == "train" else max(n_synthetic // 10, 2)
            for task in ("arithmetic", "reverse"):
                for ex in make_examples(task, count // 2, seed=seed + (split == "valid")):
                    lines.append(json.dumps({"messages": [{"role": "user", "content": ex["prompt"]},
                                                          {"role": "assistant", "content": ex["completion"]}]}))
            if n_text:
                rows = doc_texts(modules[split], n_text if split == "train" else max(n_text // 10, 2), random.Random(seed))
                lines += [json.dumps(row) for row in rows]
        rng.shuffle(lines)
        (mix / f"{split}.jsonl").write_text("".join(line + "\n" for line in lines))
        print(f"{mix / split}.jsonl: {len(lines)} rows")

if __name__ == "__main__":
    from mlx_sbd.backend import preload_openblas_and_reexec

    preload_openblas_and_reexec()
    main()
