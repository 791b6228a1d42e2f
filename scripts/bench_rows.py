"""time(rows) of a decoding forward on this device, for models of real shapes with random weights, beside mlx_lm's
own per-token time: the number that decides how many drafts (and whether a mask block) a verified forward should
carry. Runs unchanged on a Mac (Metal), a CUDA machine (MLX's CUDA back-end) or the CPU.

    python scripts/bench_rows.py --models smollm2-135m,qwen3-0.6b --dtype bfloat16
    python scripts/bench_rows.py --models llama-3.1-8b --context 512,4096 --out results/bench_rows_gpu.json

With --acceptance (a JSON list of per-position conditional acceptance rates, e.g. measured by
scripts/bench_lookup.py or bench_decode.py on this machine) it also prints the tokens/s that verified decoding would
reach on this device: the drafter's rate rule (drafting.Drafter) with this device's time(rows).
"""

import json
import random
import statistics
import sys
import time
from pathlib import Path

import click
import mlx.core as mx
from mlx_lm.generate import generate_step

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, save, time_mlx_lm_forward  # noqa: E402

from mlx_sbd.adapter import base_layers  # noqa: E402
from mlx_sbd.costs import RowCost, filled_cache, measure  # noqa: E402
from mlx_sbd.model import SBDModel  # noqa: E402

# Shapes from the models' own config.json files (Hugging Face).
SHAPES = {
    "smollm2-135m": dict(model_type="llama", hidden_size=576, num_hidden_layers=30, intermediate_size=1536,
                         num_attention_heads=9, num_key_value_heads=3, vocab_size=49152, rms_norm_eps=1e-5,
                         rope_theta=100000.0, tie_word_embeddings=True, max_position_embeddings=8192),
    "qwen3-0.6b": dict(model_type="qwen3", hidden_size=1024, num_hidden_layers=28, intermediate_size=3072,
                       num_attention_heads=16, num_key_value_heads=8, head_dim=128, vocab_size=151936,
                       rms_norm_eps=1e-6, rope_theta=1000000.0, tie_word_embeddings=True,
                       max_position_embeddings=40960),
    "llama-3.1-8b": dict(model_type="llama", hidden_size=4096, num_hidden_layers=32, intermediate_size=14336,
                         num_attention_heads=32, num_key_value_heads=8, vocab_size=128256, rms_norm_eps=1e-5,
                         rope_theta=500000.0, tie_word_embeddings=False, max_position_embeddings=131072,
                         rope_scaling={"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                       "original_max_position_embeddings": 8192, "rope_type": "llama3"}),
}
ROWS = [1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64]


def random_model(name: str, dtype) -> SBDModel:
    import importlib

    cfg = SHAPES[name]
    module = importlib.import_module(f"mlx_lm.models.{cfg['model_type']}")
    lm = module.Model(module.ModelArgs.from_dict(cfg))
    lm.set_dtype(dtype)
    mx.eval(lm.parameters())
    return SBDModel(lm, mx.zeros((cfg["hidden_size"],), dtype))


def warm_up(seconds: float = 0.5) -> None:
    """Busy the device for a moment, so that a measurement does not start on an idle, clocked-down GPU."""
    a = mx.random.normal((2048, 2048))
    tic = time.perf_counter()
    while time.perf_counter() - tic < seconds:
        mx.eval(a @ a)


def plain_forward_times(model: SBDModel, context: int, rows, repeats: int) -> dict:
    """{rows: median seconds} of mlx_lm's own model call on `rows` tokens over the same kind of cache (its causal
    forward, as mlx_lm's speculative decoding verifies drafts): whether a cost is the device's or our forward's."""
    cache = filled_cache(model, context)
    return {r: time_mlx_lm_forward(model, cache, r, repeats) for r in rows}


def mlx_lm_per_token(model: SBDModel, context: int, tokens: int) -> float:
    """Seconds per token of mlx_lm's generate_step after a prompt of `context` tokens (prefill not counted)."""
    with base_layers(model) as lm:  # the base as mlx_lm loads it (no idle gated layers)
        it = generate_step(mx.zeros((context,), mx.int32), lm, max_tokens=tokens + 1)
        next(it)  # prefill + first token
        tic = time.perf_counter()
        n = sum(1 for _ in it)
        return (time.perf_counter() - tic) / max(n, 1)


def predicted_rate(cost: RowCost, acceptance, max_drafts: int = 16):
    """Best expected tokens/s and its draft count for drafts whose j-th passes with acceptance[j] given the rest."""
    best = (0.0, 0)
    for m in range(min(max_drafts, len(acceptance)) + 1):
        p, expected = 1.0, 1.0
        for a in acceptance[:m]:
            p *= a
            expected += p
        best = max(best, (expected / cost(1 + m), m))
    return best


@click.command()
@click.option("--models", default="smollm2-135m,qwen3-0.6b,llama-3.1-8b", show_default=True)
@click.option("--dtype", default="bfloat16", show_default=True, type=click.Choice(["float32", "float16", "bfloat16"]))
@click.option("--context", default="512", show_default=True, help="Tokens already in the KV cache (a comma list: "
              "each is measured).")
@click.option("--repeats", default=5, show_default=True)
@click.option("--rounds", default=1, show_default=True, help="Sweeps over the row counts, each in a new random "
              "order after a warm-up burst of work (a GPU left idle clocks down); the median over rounds is reported, "
              "with its range.")
@click.option("--tokens", default=32, show_default=True, help="Tokens timed for mlx_lm's per-token time.")
@click.option("--plain", is_flag=True, help="Also time mlx_lm's own causal forward over the same row counts.")
@click.option("--acceptance", default=None, help="JSON list of per-position acceptance rates (optional).")
@click.option("--out", default="results/bench_rows.json", show_default=True)
def main(models, dtype, context, repeats, rounds, tokens, plain, acceptance, out):
    dt = getattr(mx, dtype)
    acc = json.loads(acceptance) if acceptance else None
    contexts = [int(c) for c in str(context).split(",")]
    results = {"machine": machine(), "dtype": dtype, "contexts": contexts, "device": str(mx.default_device()),
               "models": {}}
    for name in models.split(","):
        model = random_model(name, dt)
        for ctx in contexts:
            sweeps, per_tokens, plains = [], [], []
            for _ in range(rounds):
                warm_up()
                sweeps.append(measure(model, rows=random.sample(ROWS, len(ROWS)), context=ctx, repeats=repeats))
                per_tokens.append(mlx_lm_per_token(model, ctx, tokens))
                if plain:
                    plains.append(plain_forward_times(model, ctx, random.sample(ROWS, len(ROWS)), repeats))
            times = {r: statistics.median(s[r] for s in sweeps) for r in ROWS}
            per_token = statistics.median(per_tokens)
            cost = RowCost(times)
            entry = {"seconds": {str(r): t for r, t in times.items()}, "mlx_lm_per_token_s": per_token,
                     "rounds": [{str(r): t for r, t in s.items()} for s in sweeps], "mlx_lm_rounds": per_tokens}
            if plain:
                entry["plain_seconds"] = {str(r): statistics.median(p[r] for p in plains) for r in ROWS}
            print(f"\n{name} ({dtype}, context {ctx}, {mx.default_device()}): mlx_lm {1e3 * per_token:.2f} ms/token")
            print(f"{'rows':>5} {'ms':>9} {'x 1 row':>8} {'range of x 1 row over rounds':>29}")
            for r in ROWS:
                ratios = [s[r] / s[1] for s in sweeps]
                line = f"{r:5d} {1e3 * times[r]:9.2f} {times[r] / times[1]:8.2f} {min(ratios):14.2f}-{max(ratios):.2f}"
                if plain:
                    p = entry["plain_seconds"]
                    line += f"   mlx_lm forward {1e3 * p[str(r)]:8.2f} ms, x 1 row {p[str(r)] / p['1']:.2f}"
                print(line)
            if acc:
                rate, m = predicted_rate(cost, acc)
                entry["predicted"] = {"tokens_per_s": rate, "drafts": m, "speedup_vs_mlx_lm": rate * per_token}
                print(f"predicted with acceptance {acc}: {rate:.1f} tokens/s with {m} drafts, "
                      f"{rate * per_token:.2f}x mlx_lm")
            results["models"].setdefault(name, {})[str(ctx)] = entry
            save(results, out)  # after each measurement: a run cut short keeps what it measured
        del model
        mx.clear_cache()


if __name__ == "__main__":
    main()
