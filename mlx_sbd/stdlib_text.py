"""Real text every Python install has, for training and measuring drafts offline: the standard library's own
source code and docstrings, split by module (80/10/10, seeded) so that held-out prompts come from modules that
were never trained on.

Everything here reads files (ast over the modules' source, no import) except `documented`, which imports a
module to read its docstrings (chat prompts about it); modules that fail to import are skipped.
"""

import ast
import importlib
import importlib.util
import inspect
import random
import re
import sys
import warnings
from typing import Dict, List, Optional

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


def split_modules(seed: int = 0) -> Dict[str, List[str]]:
    """{train, valid, test: [stdlib module name]}: the public top-level modules, split 80/10/10 by a seeded shuffle."""
    names = sorted(n for n in sys.stdlib_module_names if not n.startswith("_") and n not in SKIP)
    random.Random(seed).shuffle(names)
    cut1, cut2 = int(0.8 * len(names)), int(0.9 * len(names))
    return {"train": names[:cut1], "valid": names[cut1:cut2], "test": names[cut2:]}


def source(mod_name: str) -> Optional[str]:
    """The module's Python source (its __init__.py for a package), or None when it has none (C modules)."""
    try:
        spec = importlib.util.find_spec(mod_name)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.origin or not spec.origin.endswith(".py"):
        return None
    try:
        with open(spec.origin, encoding="utf-8") as f:
            return f.read()
    except (OSError, UnicodeDecodeError):
        return None


def functions(mod_name: str) -> List[ast.FunctionDef]:
    """Top-level functions and class methods with a docstring, parsed from the module's source (not imported)."""
    text = source(mod_name)
    if text is None:
        return []
    try:
        tree = ast.parse(text)
    except SyntaxError:
        return []
    found = []
    for node in tree.body:
        inner = node.body if isinstance(node, ast.ClassDef) else [node]
        found += [(text, f) for f in inner if isinstance(f, ast.FunctionDef) and ast.get_docstring(f)]
    return found


def code_texts(modules: List[str], n: int, seed: int = 0, limit: int = 1500) -> List[str]:
    """Up to n function sources (whole functions of at most `limit` characters, dedented), seeded random order."""
    texts = []
    for mod in modules:
        for text, f in functions(mod):
            segment = ast.get_source_segment(text, f, padded=True)
            if segment and 200 <= len(segment) <= limit:
                texts.append(inspect.cleandoc("\n" + segment) if segment.startswith(" ") else segment)
    random.Random(seed).shuffle(texts)
    return texts[:n]


def code_prompts(modules: List[str], n: int, seed: int = 0) -> List[str]:
    """Up to n completion prompts: a function's header and docstring, whose body the model is to write."""
    prompts = []
    for mod in modules:
        for text, f in functions(mod):
            body = f.body[1:]  # after the docstring
            if not body or f.end_lineno - f.lineno < 4:
                continue
            lines = text.splitlines()
            head = "\n".join(lines[f.lineno - 1 : body[0].lineno - 1])
            indent = len(lines[f.lineno - 1]) - len(lines[f.lineno - 1].lstrip())
            head = "\n".join(line[indent:] for line in head.splitlines())
            if 40 <= len(head) <= 1200:
                prompts.append(head + "\n")
    random.Random(seed).shuffle(prompts)
    return prompts[:n]


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


def each_documented(modules: List[str]):
    """(name, module, its callables) of each module of `modules` that imports here (documented), in order."""
    for mod_name in modules:
        found = documented(mod_name)
        if found is not None:
            yield (mod_name, *found)


def first_paragraph(doc: str, limit: int = 320) -> str:
    return inspect.cleandoc(doc).split("\n\n")[0].strip()[:limit]


def doc_texts(modules: List[str], n: int, seed: int = 0, limit: int = 1200) -> List[str]:
    """Up to n plain-text rows: whole docstrings (cut at a paragraph break before `limit` characters) of the
    modules and of their public callables, in a seeded random order."""
    texts = []
    for _, mod, callables in each_documented(modules):
        for doc in [inspect.getdoc(mod)] + [doc for _, _, doc in callables]:
            if not doc or len(doc) < 200:
                continue
            cut = doc[:limit]
            if len(doc) > limit and "\n\n" in cut:
                cut = cut[: cut.rindex("\n\n")]
            texts.append(cut.strip())
    random.Random(seed).shuffle(texts)
    return texts[:n]


def chat_prompts(modules: List[str], seed: int = 0) -> List[str]:
    """Questions a user might ask about the modules (their docstrings in instruction templates), seeded order."""
    rng = random.Random(seed)
    items = []
    for mod_name, mod, callables in each_documented(modules):
        if mod.__doc__ and len(mod.__doc__) > 40:
            items += [t.format(mod=mod_name, doc=first_paragraph(mod.__doc__)) for t in MODULE_TEMPLATES]
        for name, obj, doc in callables:
            if not doc or len(doc) < 40:
                continue
            try:
                # defaults like <object object at 0x7f...> name an address: the same prompt in every process
                sig = re.sub(r" at 0x[0-9a-fA-F]+", "", str(inspect.signature(obj)))
            except (TypeError, ValueError):
                sig = "(...)"
            items.append(rng.choice(TEMPLATES).format(name=f"{mod_name}.{name}", sig=sig, doc=first_paragraph(doc)))
    rng.shuffle(items)
    return items


def write_text_set(folder, n_train: int = 1024, n_valid: int = 32, seed: int = 0, code_share: float = 0.5) -> dict:
    """Write a training folder of plain-text rows ({"text"}: function sources and docstrings, `code_share` of them
    code) from the train and valid modules, unless it is there already; -> {split: rows}. The data a run with soft
    targets (loss.gated_sbd_loss) needs: the base model's own distributions are its labels, so no answers are
    generated. Files are written whole and renamed (every process of a distributed run may write them)."""
    import json
    import os
    from pathlib import Path

    from tqdm import tqdm

    folder = Path(folder)
    if (folder / "train.jsonl").is_file() and (folder / "valid.jsonl").is_file():
        return {split: (folder / f"{split}.jsonl").read_text().count("\n") for split in ("train", "valid")}
    folder.mkdir(parents=True, exist_ok=True)
    modules = split_modules(seed)
    counts = {}
    for split, n in (("train", n_train), ("valid", n_valid)):
        code, docs = [], []
        for mod in tqdm(modules[split], desc=f"stdlib text ({split})", unit="module", leave=False):
            code += code_texts([mod], 10**6, seed)
            docs += doc_texts([mod], 10**6, seed)
        random.Random(seed).shuffle(code)
        random.Random(seed).shuffle(docs)
        n_code = min(round(n * code_share), len(code))
        rows = code[:n_code] + docs[: n - n_code]
        random.Random(seed).shuffle(rows)
        tmp = folder / f".{split}.jsonl.tmp{os.getpid()}"
        tmp.write_text("".join(json.dumps({"text": t}) + "\n" for t in rows))
        os.replace(tmp, folder / f"{split}.jsonl")
        counts[split] = len(rows)
    return counts
