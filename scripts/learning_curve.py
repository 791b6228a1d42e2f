"""Tokens per forward of SBD decoding along training: teacher-forced block decoding of held-out reference answers,
for a series of adapter checkpoints.

    python scripts/learning_curve.py --data data/smollm2-distill --k 4 --gamma 0.1 \
        --adapter 100:runs/stage1 --adapter 250:runs/stage2 --adapter 400:mlx_sbd/adapters/smollm2-135m-instruct-sbd

Full decoding (scripts/eval_adapter.py) lets each model write its own answer, so two checkpoints decode different
texts and a few dozen answers cost minutes per setting. Here every checkpoint decodes the same texts, the base
model's greedy answers to the held-out test prompts (what the adapter is distilled to reproduce), in the training
layout: the clean sequence plus a noised copy whose answer positions start masked, blocks aligned at multiples of k
as in decoding (masks.training_mask: a block sees the clean tokens before it and itself). Each forward applies the
EB rule (mlx_sbd.samplers) to every block at once and writes the *reference* tokens into the revealed positions
(teacher forcing), until no mask is left. A block's forwards are what SBD decoding would spend on it if the model
had produced the reference so far; `wrong` is the share of revealed tokens whose argmax differs from the
reference (where free decoding would change the text). Prints a table; saves raw JSON.
"""

import sys
from pathlib import Path

import click
import mlx.core as mx
import numpy as np
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, save  # noqa: E402

import mlx_sbd  # noqa: E402
from mlx_sbd.data import read_jsonl  # noqa: E402
from mlx_sbd.decode import log_softmax  # noqa: E402
from mlx_sbd.generate import encode_prompt  # noqa: E402
from mlx_sbd.masks import training_mask  # noqa: E402
from mlx_sbd.model import MASK_ID  # noqa: E402
from mlx_sbd.samplers import make_selector  # noqa: E402


def reference(tokenizer, row: dict) -> tuple:
    """(prompt + answer ids up to and including the first EOS, prompt length)."""
    prompt = encode_prompt(tokenizer, row["messages"][:1])
    full = list(tokenizer.apply_chat_template(row["messages"], tokenize=True))
    answer = full[len(prompt):]
    end = next((i + 1 for i, t in enumerate(answer) if t in tokenizer.eos_token_ids), len(answer))
    return prompt + answer[:end], len(prompt)


def teacher_forced(model, seq: list, start: int, k: int, select) -> dict:
    """Decode seq[start:] block by block with teacher forcing; -> forwards summed over blocks, tokens, wrong.

    The clean sequence goes into a KV cache once (its causal K/V are what every block attends to); each forward
    then carries only the noised blocks from the one holding `start` on, under masks.training_mask's rows for
    them: a block sees the clean keys before it and its own block.
    """
    L, s0 = len(seq), start // k * k
    clean = np.array(seq, np.int32)
    target = clean[s0:]  # what the noised blocks must come to hold
    noised = target.copy()
    noised[start - s0:] = MASK_ID
    cache = model.make_cache()
    model.forward(mx.array(clean)[None], cache=cache)
    # The training mask's rows of the noised queries from s0 on, over the clean keys (now in the cache) and the
    # noised keys from s0 on (blocks before s0 are never seen by these rows: s0 starts a block).
    both = training_mask(L, k)  # [2L, 2L]: clean half, then noised half
    mask = mx.concatenate([both[L + s0:, :L], both[L + s0:, L + s0:]], axis=1)
    positions = mx.arange(s0, L)
    forwards = wrong = 0
    while (noised == MASK_ID).any():
        h = model.forward(mx.array(noised)[None], positions=positions, mask=mask, cache=cache, return_hidden=True)
        for c in cache:
            c.trim(len(noised))
        logprobs = log_softmax(model.logits(h[0]))
        argmax = np.array(logprobs.argmax(axis=-1))
        for b in range(0, len(noised), k):
            blk = slice(b, b + k)
            masked = noised[blk] == MASK_ID
            if not masked.any():
                continue
            forwards += 1
            reveal = np.array(select(logprobs[blk], mx.array(masked)))
            wrong += int((argmax[blk][reveal] != target[blk][reveal]).sum())
            noised[blk][reveal] = target[blk][reveal]
    return {"forwards": forwards, "tokens": L - start, "wrong": wrong}


def verified(model, tokenizer, seq: list, start: int, k: int, gamma: float) -> dict:
    """Verified decoding of the prompt seq[:start], through the decoder itself (decode.decode_steps): for a gated
    adapter its output is the base's greedy answer, so on a reference answer made by the base the score is its
    forwards; `wrong` counts tokens where the output leaves the reference (0 unless the reference is not the base's)."""
    answer = seq[start:]
    eos = [t for t in answer if t in tokenizer.eos_token_ids]
    out, last = [], None
    for last in mlx_sbd.stream_generate(model, tokenizer, seq[:start], max_tokens=len(answer), block_size=k,
                                        gamma=gamma):
        out += last.tokens
    out += eos[:1] if last.finish_reason == "stop" else []
    wrong = sum(a != b for a, b in zip(out, answer)) + abs(len(out) - len(answer))
    return {"forwards": last.nfe, "tokens": len(answer), "wrong": wrong}


def parse_adapter(spec: str) -> tuple:
    """"STEPS:PATH" -> (steps, path), or a usage error naming what is wrong."""
    steps, _, path = spec.partition(":")
    if not steps.isdigit() or not path:
        raise click.BadParameter(f"'{spec}' is not STEPS:PATH (e.g. 100:adapters/stage1)", param_hint="--adapter")
    if not Path(path).is_dir():
        raise click.BadParameter(f"no adapter folder at {path}", param_hint="--adapter")
    return int(steps), path


@click.command()
@click.option("--data", required=True, help="Folder from scripts/make_distill_data.py (test.jsonl is used).")
@click.option("--adapter", "adapters", multiple=True, required=True,
              help="STEPS:PATH, an adapter (or checkpoint) folder and the total training steps behind it; repeatable.")
@click.option("--n-rows", default=20, show_default=True, help="Held-out reference answers decoded per adapter.")
@click.option("--k", "block_size", default=4, show_default=True)
@click.option("--gamma", default=0.1, show_default=True)
@click.option("--verified", "verified_mode", is_flag=True, help="Score verified decoding (gated adapters: forwards to reproduce the base's "
              "answers, with the real decoder) instead of the lossy loop teacher-forced.")
@click.option("--out", default="results/learning_curve.json", show_default=True)
def main(data, adapters, n_rows, block_size, gamma, verified_mode, out):
    points = [parse_adapter(spec) for spec in adapters]  # all checked before the first (minutes-long) point
    rows = [row for _, row in read_jsonl(Path(data) / "test.jsonl")][:n_rows]
    select = None if verified_mode else make_selector("entropy", gamma)
    results = {"machine": machine(), "data": data, "n_rows": len(rows), "block_size": block_size, "gamma": gamma,
               "mode": "verified" if verified_mode else "lossy, teacher-forced",
               "points": []}
    print("| steps | adapter | tokens | forwards | tokens per forward | revealed tokens != reference |")
    print("|---|---|---|---|---|---|")
    for steps, path in points:
        model, tokenizer = mlx_sbd.load(adapter_path=path)
        total = {"forwards": 0, "tokens": 0, "wrong": 0}
        for row in tqdm(rows, desc=f"step {steps}", leave=False):
            seq, start = reference(tokenizer, row)
            score = (verified(model, tokenizer, seq, start, block_size, gamma) if verified_mode
                     else teacher_forced(model, seq, start, block_size, select))
            for key, v in score.items():
                total[key] += v
        point = {"steps": steps, "adapter": path, **total, "tokens_per_forward": total["tokens"] / total["forwards"],
                 "wrong_share": total["wrong"] / total["tokens"]}
        results["points"].append(point)
        print(f"| {steps} | {path} | {total['tokens']} | {total['forwards']} | {point['tokens_per_forward']:.3f} | "
              f"{point['wrong_share']:.1%} |", flush=True)
        save(results, out)


if __name__ == "__main__":
    from mlx_sbd.backend import preload_openblas_and_reexec

    preload_openblas_and_reexec()
    main()
