"""How many tokens per forward the EB-Sampler could reach on held-out answers if SBD's masked predictions were as
sharp as the model's own next-token predictions: a ceiling set by the data and the model, not by SBD training.

    python scripts/entropy_ceiling.py --data data/smollm2-distill --adapter base \
        --adapter mlx_sbd/adapters/smollm2-135m-instruct-sbd [--answers own]

A masked position j of a block is predicted from the tokens before the block and whatever the block has revealed,
never from more than all of x_<j; the causal path predicts x_j from all of x_<j. Conditioning on more cannot raise
entropy on average, so for a calibrated model the causal entropy H(x_j | x_<j) is the least its masked prediction
of x_j can have. This script takes one causal forward over each answer, gives every masked position that entropy
in every forward of its block, and runs the EB rule (SBD_METHOD.md §4) on it with blocks aligned as in decoding.
The count estimates the fewest forwards an SBD model as calibrated as its causal path could spend. It is not a
strict bound (conditioning lowers entropy on average, not in every context, and the EB count is not linear in the
entropies), but a real model falls short of it wherever its masked positions miss the tokens between the block
start and themselves.

The answers: by default the base model's greedy answers to the held-out test prompts (the texts
scripts/learning_curve.py teacher-forces); with `--answers own`, each model's own greedy answers (one token per
forward, up to 128 tokens, as scripts/eval_adapter.py decodes the same prompts), the texts free SBD decoding of a
model that agrees with its causal path would write. Prints a table; saves raw JSON.
"""

import sys
from pathlib import Path

import click
import mlx.core as mx
import numpy as np
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, save  # noqa: E402
from learning_curve import reference  # noqa: E402

import mlx_sbd  # noqa: E402
from mlx_sbd.data import read_jsonl  # noqa: E402
from mlx_sbd.decode import log_softmax  # noqa: E402
from mlx_sbd.generate import encode_prompt  # noqa: E402
from mlx_sbd.samplers import entropy  # noqa: E402


def causal_entropies(model, seq: list, start: int) -> np.ndarray:
    """Entropy (nats) of the causal prediction of each of seq[start:], given every token before it."""
    return np.array(entropy(log_softmax(model(mx.array(seq[:-1])[None])[0, start - 1 :])))


def own_answer(model, tokenizer, row: dict, max_tokens: int) -> tuple:
    """(prompt + the model's greedy one-token-per-forward answer, EOS included if reached; prompt length)."""
    prompt, answer = encode_prompt(tokenizer, row["messages"][:1]), []
    for r in mlx_sbd.stream_generate(model, tokenizer, prompt, max_tokens=max_tokens, block_size=1):
        answer += r.tokens + ([next(iter(tokenizer.eos_token_ids))] if r.finish_reason == "stop" else [])
    return prompt + answer, len(prompt)


def eb_forwards(errors: np.ndarray, gamma: float) -> int:
    """Forwards the EB rule spends on one block whose masked positions keep these errors in every forward.

    Each forward sorts the masked errors ascending and reveals the first s, s >= 1 the largest with the sum of the
    first s - 1 <= gamma (the position that crosses the budget is still revealed).
    """
    left, forwards = np.sort(errors), 0
    while len(left):
        spent_before = np.concatenate([[0.0], np.cumsum(left)[:-1]])
        s = max(1, int((spent_before <= gamma).sum()))
        left, forwards = left[s:], forwards + 1
    return forwards


def ceiling_forwards(entropies: np.ndarray, start: int, k: int, gamma: float) -> int:
    """Forwards over an answer starting at sequence position `start`, blocks at multiples of k as in decoding (the
    first block's positions before `start` are prompt tokens, already revealed)."""
    positions = start + np.arange(len(entropies))
    return sum(eb_forwards(entropies[positions // k == b], gamma) for b in np.unique(positions // k))


@click.command()
@click.option("--data", required=True, help="Folder with a test.jsonl of chat rows (scripts/make_distill_data.py); "
              "with --answers own the user message of each row is enough.")
@click.option("--model", default=None, help="Base model (default: built-in SmolLM2-135M-Instruct).")
@click.option("--adapter", "adapters", multiple=True, default=("base",), show_default=True,
              help="Adapter folder whose causal path to measure, or 'base' for the plain model; repeatable.")
@click.option("--answers", type=click.Choice(["base", "own"]), default="base", show_default=True,
              help="base: the base model's greedy answers in the data folder; own: each model's own greedy answers.")
@click.option("--n-rows", default=20, show_default=True, help="Prompts: the first rows of test.jsonl.")
@click.option("--max-tokens", default=128, show_default=True, help="Answer length limit with --answers own.")
@click.option("--block-sizes", default="4,8,16", show_default=True)
@click.option("--gammas", default="0.1,0.35", show_default=True)
@click.option("--out", default="results/entropy_ceiling.json", show_default=True)
def main(data, model, adapters, answers, n_rows, max_tokens, block_sizes, gammas, out):
    for a in adapters:
        if a != "base" and not Path(a).is_dir():
            raise click.BadParameter(f"no adapter folder at {a}", param_hint="--adapter")
    rows = [row for _, row in read_jsonl(Path(data) / "test.jsonl")][:n_rows]
    ks, gs = [int(k) for k in block_sizes.split(",")], [float(g) for g in gammas.split(",")]
    results = {"machine": machine(), "model": model or "SmolLM2-135M-Instruct (built-in)", "data": data,
               "answers": answers, "n_rows": len(rows), "models": []}
    for a in adapters:
        m, tokenizer = mlx_sbd.load(model, adapter_path=False if a == "base" else a)
        texts = [own_answer(m, tokenizer, row, max_tokens) if answers == "own" else reference(tokenizer, row)
                 for row in tqdm(rows, desc=f"{a}: answers", leave=False)]
        ents = [causal_entropies(m, seq, start) for seq, start in texts]
        flat = np.concatenate(ents)
        entry = {"adapter": a, "tokens": int(len(flat)), "mean_entropy": float(flat.mean()),
                 "share_below": {str(t): float((flat <= t).mean()) for t in (0.01, 0.1, 0.35)}, "ceiling": []}
        for k in ks:
            for g in gs:
                nfe = sum(ceiling_forwards(e, start, k, g) for e, (_, start) in zip(ents, texts))
                entry["ceiling"].append({"block_size": k, "gamma": g, "forwards": nfe,
                                         "tokens_per_forward": len(flat) / nfe})
        results["models"].append(entry)
    print(f"\n{'the base model' if answers == 'base' else 'each model'}'s greedy answers to {len(rows)} prompts "
          f"of {Path(data) / 'test.jsonl'}")
    print("| causal path of | tokens | mean entropy (nats) | entropy <= 0.1 | "
          + " | ".join(f"k={c['block_size']}, gamma {c['gamma']}" for c in results["models"][0]["ceiling"]) + " |")
    print("|---" * (4 + len(ks) * len(gs)) + "|")
    for m in results["models"]:
        print(f"| {m['adapter']} | {m['tokens']} | {m['mean_entropy']:.3f} | {m['share_below']['0.1']:.1%} | "
              + " | ".join(f"{c['tokens_per_forward']:.2f}" for c in m["ceiling"]) + " |")
    save(results, out)


if __name__ == "__main__":
    from mlx_sbd.backend import preload_openblas_and_reexec

    preload_openblas_and_reexec()
    main()
