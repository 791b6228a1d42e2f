"""Greedy losslessness at scale: verified SBD decoding against mlx_lm.generate on the base weights.

For each held-out prompt (stdlib_text's test split: questions about standard-library modules never seen in
training, built offline from docstrings) both decode --max-tokens tokens greedily: mlx_lm on the base model
loaded by mlx_lm itself, and mlx-sbd's verified decoding with the adapter. Prints, per setting, how many outputs
are token-identical (the guarantee), tokens per forward and the draft acceptance rate; saves every output as JSON.
With an ungated adapter the reference is the adapter's own block_size=1 decoding instead (--reference self).

    python scripts/check_lossless.py --adapter-path mlx_sbd/adapters/smollm2-135m-instruct-sbd-gated --prompts 40
"""

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
from mlx_sbd.generate import encode_prompt  # noqa: E402
from mlx_sbd.loading import resolve  # noqa: E402


def mlx_lm_greedy(lm, tokenizer, ids, n):
    out = [r.token for r in mlx_lm_stream_generate(lm, tokenizer, mx.array(ids), max_tokens=n)]
    return out[:-1] if out and out[-1] in tokenizer.eos_token_ids else out


def sbd(model, tokenizer, ids, **kw):
    out, last = [], None
    for last in mlx_sbd.stream_generate(model, tokenizer, ids, **kw):
        out += last.tokens
    return out, last


@click.command()
@click.option("--model", default=None, help="Base model (default: the built-in SmolLM2-135M-Instruct).")
@click.option("--adapter-path", default=None, help="SBD adapter (default: the built-in model's shipped adapter).")
@click.option("--reference", type=click.Choice(["base", "self"]), default="base", show_default=True,
              help="base: mlx_lm.generate on the base weights (gated adapters); self: block_size=1 with the adapter.")
@click.option("--prompts", "n_prompts", default=40, show_default=True)
@click.option("--max-tokens", default=128, show_default=True)
@click.option("--settings", default="8:0.35,8:inf", show_default=True, help="block_size:gamma pairs.")
@click.option("--out", default="results/check_lossless.json", show_default=True)
def main(model, adapter_path, reference, n_prompts, max_tokens, settings, out):
    sbd_model, tokenizer = mlx_sbd.load(model, adapter_path=adapter_path)
    if reference == "base":
        lm, ref_tok = mlx_lm.load(str(resolve(model)))
        ref_fn = lambda ids: mlx_lm_greedy(lm, ref_tok, ids, max_tokens)  # noqa: E731
    else:
        ref_fn = lambda ids: sbd(sbd_model, tokenizer, ids, max_tokens=max_tokens, block_size=1)[0]  # noqa: E731
    prompts = chat_prompts(split_modules(0)["test"], 0)[:n_prompts]
    pairs = [(int(k), float(g)) for k, g in (s.split(":") for s in settings.split(","))]
    rows = {p: {"identical": 0, "tokens": 0, "nfe": 0, "drafted": 0, "accepted": 0, "seconds": 0.0} for p in pairs}
    outputs = []
    for text in tqdm(prompts, desc="prompts"):
        ids = encode_prompt(tokenizer, text)
        ref = ref_fn(ids)
        record = {"prompt": text, "reference": ref, "sbd": {}}
        for k, g in pairs:
            tic = time.perf_counter()
            got, last = sbd(sbd_model, tokenizer, ids, max_tokens=max_tokens, block_size=k, gamma=g)
            r = rows[k, g]
            r["seconds"] += time.perf_counter() - tic
            r["identical"] += got == ref
            r["tokens"] += last.generation_tokens
            r["nfe"] += last.nfe
            r["drafted"] += last.drafted
            r["accepted"] += last.accepted
            record["sbd"][f"{k}:{g}"] = {"tokens": got, "identical": got == ref, "nfe": last.nfe}
        outputs.append(record)
    print(f"\nmachine: {machine()}\nreference: {reference}, {len(prompts)} prompts x {max_tokens} tokens, greedy")
    print(f"{'k':>3} {'gamma':>6} {'identical':>10} {'tokens':>7} {'NFE':>6} {'tok/fwd':>8} {'accepted':>10}")
    for (k, g), r in rows.items():
        rate = r["accepted"] / max(r["drafted"], 1)
        print(f"{k:>3} {g:>6} {r['identical']:>4}/{len(prompts):<5} {r['tokens']:>7} {r['nfe']:>6} "
              f"{r['tokens'] / max(r['nfe'], 1):>8.2f} {100 * rate:>9.1f}%")
    save({"machine": machine(), "model": model or "built-in SmolLM2-135M-Instruct", "adapter": adapter_path,
          "reference": reference, "max_tokens": max_tokens,
          "rows": [{"block_size": k, "gamma": g, **r} for (k, g), r in rows.items()], "outputs": outputs}, out)
    if any(r["identical"] != len(prompts) for r in rows.values()):
        sys.exit("NOT LOSSLESS: some outputs differ from the reference")


if __name__ == "__main__":
    from mlx_sbd.backend import preload_openblas_and_reexec

    preload_openblas_and_reexec()
    main()
