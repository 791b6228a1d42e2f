"""Self-distillation data for an SBD adapter of the built-in SmolLM2: the base model's own greedy answers.

Prompts are built from real text available offline, the docstrings of the Python standard library, with a few
instruction templates (mlx_sbd.stdlib_text); modules are split between train/valid/test so that test prompts are
about modules never seen in training. Answers come from the base model with greedy decoding (mlx_lm.batch_generate, ~2x the
throughput of one prompt at a time with OpenBLAS), written chunk by chunk so that an interrupted run keeps what it
made: rerun the same command to continue. Fine-tuning on the model's own answers keeps its behaviour while it
learns to predict blocks of its own future tokens. <out>/mix is the folder to train on: the distilled rows plus
synthetic task rows (mlx_sbd.tasks) and, with --n-text, plain-text rows of documentation (docstrings of the
train/valid modules, never the test modules'), which keep ordinary text in the objective; shuffled.

With --n-code, each split also gets code completions: a function's header and docstring from its modules (the
held-out code prompts' kind, mlx_sbd.heldout), continued by the base model without the chat template, written as
text rows. The prompts of every split are written first to <out>/prompts.jsonl and read back from there on a
rerun, so answers made on another machine (another Python, whose standard library splits into other modules) still
never touch the test modules of the machine that wrote the prompts.

    python scripts/make_distill_data.py --out data/smollm2-distill --n-train 320 --n-valid 24 --n-test 40
"""

import json
import random
from pathlib import Path

import click
from mlx_lm import batch_generate
from tqdm import tqdm

import mlx_sbd
from mlx_sbd.generate import encode_prompt
from mlx_sbd.stdlib_text import chat_prompts, code_prompts, doc_texts, split_modules
from mlx_sbd.tasks import make_examples

@click.command()
@click.option("--out", default="data/smollm2-distill", show_default=True)
@click.option("--n-train", default=320, show_default=True)
@click.option("--n-valid", default=24, show_default=True)
@click.option("--n-test", default=40, show_default=True)
@click.option("--n-synthetic", default=100, show_default=True, help="Synthetic task examples added to train (1/10 to valid).")
@click.option("--n-text", default=0, show_default=True, help="Plain documentation-text rows added to train (1/10 to valid).")
@click.option("--n-code", default=0, show_default=True, help="Code completions in train (a function's header and docstring -> the base's body); valid and test get a tenth as many, at most as many as their chat prompts.")
@click.option("--max-tokens", default=128, show_default=True)
@click.option("--seed", default=0, show_default=True)
@click.option("--batch-size", default=16, show_default=True, help="Prompts answered together by mlx_lm.batch_generate.")
def main(out, n_train, n_valid, n_test, n_synthetic, n_text, n_code, max_tokens, seed, batch_size):
    model, tokenizer = mlx_sbd.load(adapter_path=False)  # the base model's own answers
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    prompts = split_prompts(out / "prompts.jsonl", {"test": n_test, "valid": n_valid, "train": n_train}, n_code, seed)
    for split, todo in prompts.items():
        path = out / f"{split}.jsonl"
        if not todo:  # no file rather than an empty one, which training refuses
            continue
        done = path.read_text().count("\n") if path.exists() else 0  # resume a stopped run
        with open(path, "a") as f, tqdm(desc=f"{split} answers", initial=done, total=len(todo)) as bar:
            for i in range(done, len(todo), batch_size):
                chunk = todo[i : i + batch_size]
                ids = [encode_prompt(tokenizer, p["prompt"], chat_template=p["kind"] == "chat") for p in chunk]
                answers = batch_generate(model.lm, tokenizer, ids, max_tokens=max_tokens).texts
                for p, answer in zip(chunk, answers):
                    if p["kind"] == "chat":
                        row = {"messages": [{"role": "user", "content": p["prompt"]},
                                            {"role": "assistant", "content": answer.strip()}]}
                    else:  # a completion is the prompt's continuation, as the held-out code prompts are decoded
                        row = {"text": p["prompt"] + answer}
                    f.write(json.dumps(row) + "\n")
                f.flush()
                bar.update(len(chunk))
        print(f"{split}: {len(todo)} distilled rows -> {path}")
    # The folder to train on: distilled rows plus synthetic task and text rows (1/10 as many in valid), shuffled.
    mix = out / "mix"
    mix.mkdir(exist_ok=True)
    modules = split_modules(seed)
    rng = random.Random(seed)
    for split in ("train", "valid", "test"):
        lines = (out / f"{split}.jsonl").read_text().splitlines() if (out / f"{split}.jsonl").is_file() else []
        if split != "test":
            count = n_synthetic if split == "train" else max(n_synthetic // 10, 2)
            for task in ("arithmetic", "reverse"):
                for ex in make_examples(task, count // 2, seed=seed + (split == "valid")):
                    lines.append(json.dumps({"messages": [{"role": "user", "content": ex["prompt"]},
                                                          {"role": "assistant", "content": ex["completion"]}]}))
            if n_text:
                texts = doc_texts(modules[split], n_text if split == "train" else max(n_text // 10, 2), seed)
                lines += [json.dumps({"text": t}) for t in texts]
        rng.shuffle(lines)
        if not lines:
            continue
        (mix / f"{split}.jsonl").write_text("".join(line + "\n" for line in lines))
        print(f"{mix / split}.jsonl: {len(lines)} rows")

def split_prompts(path: Path, counts: dict, n_code: int, seed: int) -> dict:
    """{split: [{"kind", "prompt"}]}: counts[split] chat prompts and n_code code completion prompts (outside train a
    tenth as many, at most counts[split]) of that split's modules, shuffled together; read from `path` when an
    earlier run wrote it."""
    if path.is_file():
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        return {split: [r for r in rows if r["split"] == split] for split in counts}
    modules = split_modules(seed)
    out = {}
    for split, n in counts.items():
        chat = [{"kind": "chat", "prompt": p} for p in chat_prompts(modules[split], seed)[:n]]
        m = n_code if split == "train" else min(n_code // 10, n)
        code = [{"kind": "code", "prompt": p} for p in code_prompts(modules[split], m, seed)]
        rows = chat + code
        if code:  # chat alone keeps chat_prompts' order, as before --n-code
            random.Random(seed).shuffle(rows)
        out[split] = [{"split": split, **r} for r in rows]
    path.write_text("".join(json.dumps(r) + "\n" for rows in out.values() for r in rows))
    return out


if __name__ == "__main__":
    from mlx_sbd.backend import preload_openblas_and_reexec

    preload_openblas_and_reexec()
    main()
