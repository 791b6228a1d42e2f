"""Self-distillation data for an SBD adapter of the built-in SmolLM2: the base model's own greedy answers.

Prompts are built from real text available offline, the docstrings of the Python standard library, with a few
instruction templates (mlx_sbd.stdlib_text); modules are split between train/valid/test so that test prompts are
about modules never seen in training. Answers come from the base model with greedy decoding (mlx_sbd.distill:
mlx_lm.batch_generate, ~2x the throughput of one prompt at a time with OpenBLAS), written chunk by chunk so that an
interrupted run keeps what it made: rerun the same command to continue. `mlx-sbd train --data self` makes such a
set itself. Fine-tuning on the model's own answers keeps its behaviour while it learns to predict blocks of its own
future tokens. <out>/mix is the folder to train on: the distilled rows plus
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

import mlx_sbd
from mlx_sbd.distill import answer_prompts, split_prompts
from mlx_sbd.stdlib_text import doc_texts, split_modules
from mlx_sbd.tasks import make_examples


@click.command()
@click.option("--out", default="data/smollm2-distill", show_default=True)
@click.option("--n-train", default=320, show_default=True)
@click.option("--n-valid", default=24, show_default=True)
@click.option("--n-test", default=40, show_default=True)
@click.option("--n-synthetic", default=100, show_default=True, help="Synthetic task examples added to train (1/10 to valid).")
@click.option("--n-text", default=0, show_default=True, help="Plain documentation-text rows added to train (1/10 to valid).")
@click.option("--n-code", default=0, show_default=True, help="Code completions in train (a function's header and docstring -> the base's body); valid and test get a tenth as many, at most as many as their chat prompts.")
@click.option("--n-general", default=0, show_default=True, help="General chat questions in train (mlx_sbd.general_prompts: everyday topics of the split); valid and test get a tenth as many, at most as many as their chat prompts.")
@click.option("--max-tokens", default=128, show_default=True)
@click.option("--seed", default=0, show_default=True)
@click.option("--batch-size", default=16, show_default=True, help="Prompts answered together by mlx_lm.batch_generate.")
@click.option("--prompts-only", is_flag=True, help="Write <out>/prompts.jsonl and stop: the prompts of a stage whose "
              "answers are made elsewhere (scripts/device_stage.sh), split by this machine's standard library.")
def main(out, n_train, n_valid, n_test, n_synthetic, n_text, n_code, n_general, max_tokens, seed, batch_size,
         prompts_only):
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    prompts = split_prompts(out / "prompts.jsonl", {"test": n_test, "valid": n_valid, "train": n_train}, n_code, seed,
                            n_general)
    if prompts_only:
        print(f"{out / 'prompts.jsonl'}: " + ", ".join(f"{len(rows)} {split}" for split, rows in prompts.items()))
        return
    model, tokenizer = mlx_sbd.load(adapter_path=False)  # the base model's own answers
    for split, todo in prompts.items():
        path = out / f"{split}.jsonl"
        if not todo:  # no file rather than an empty one, which training refuses
            continue
        answer_prompts(model, tokenizer, todo, path, max_tokens, batch_size, desc=f"{split} answers")
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

if __name__ == "__main__":
    from mlx_sbd.backend import preload_openblas_and_reexec

    preload_openblas_and_reexec()
    main()
