"""Decoding speed: mlx_lm.generate vs mlx-sbd at several block sizes and gammas, in one run.

Prints NFE, tokens per forward and tokens/s per setting, the measured forward time time(k) for
k in {1, 2, 4, 8, 16, 32} over a 256-token cache, and the paper's Eq. 16 prediction
speedup(l, k) = k*time(1) / (time(2k) + (l-1)*time(k)) next to the measured speedup over mlx_lm.
Saves the raw numbers as JSON.

Shared machines drift by 20% and more over minutes, so the settings are interleaved: each of --rounds rounds
decodes every prompt with every setting in turn (mlx_lm first), and a setting's speedup is the median over rounds
of its tokens/s over mlx_lm's in the same round (the range is printed beside it). time(k) is the median of 5
repetitions.

    python scripts/bench_decode.py                        # built-in SmolLM2 with its shipped SBD adapter
    python scripts/bench_decode.py --model M --adapter-path A --block-sizes 1,4,8,16 --gammas 0.1,0.35
"""

import statistics
import sys
import time
from pathlib import Path

import click
import mlx.core as mx
from mlx_lm.generate import stream_generate as mlx_lm_stream_generate
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, save  # noqa: E402

import mlx_sbd  # noqa: E402
from mlx_sbd.decode import block_forward, make_prompt_cache, prefill  # noqa: E402
from mlx_sbd.generate import encode_prompt  # noqa: E402

PROMPTS = [
    "Write a short story about a robot learning to paint.",
    "Explain how a hash table works, with an example in Python.",
    "List ten tips for staying productive when working from home.",
    "What is the capital of France? Answer in one sentence, then describe the city.",
]


def time_forward(model, n_new: int, cache_len: int = 256, reps: int = 5) -> float:
    """Median seconds of one block forward over n_new tokens with cache_len tokens in the cache."""
    cache = make_prompt_cache(model)
    prefill(model, cache, [(i * 7) % 1000 + 5 for i in range(cache_len)])
    tokens = [11] * n_new
    mx.eval(block_forward(model, tokens, n_new, cache))  # warm-up
    times = []
    for _ in range(reps):
        tic = time.perf_counter()
        mx.eval(block_forward(model, tokens, n_new, cache))
        times.append(time.perf_counter() - tic)
    return statistics.median(times)


def eq16_speedup(forward_times: dict, k: int, l: float) -> float:
    """Paper Eq. 16: k*time(1) / (time(2k) + (l-1)*time(k)), l = forwards per block of k tokens."""
    return k * forward_times[1] / (forward_times[2 * k] + (l - 1) * forward_times[k])


def host_overhead(reps: int = 3) -> dict:
    """Per-forward wall time on a model so small that compute is negligible: what remains is host work
    (Python, graph building, syncs). mlx_lm's one-token loop vs the SBD loop at gamma=0 (one token per forward)."""
    import tempfile

    from mlx_sbd.tiny import make_tiny_model

    with tempfile.TemporaryDirectory() as d:
        folder = make_tiny_model(d, hidden_size=32, num_hidden_layers=1, intermediate_size=64, num_attention_heads=2,
                                 num_key_value_heads=1)
        model, tokenizer = mlx_sbd.load(folder)
    tokenizer.eos_token_ids = []  # never stop early: measure exactly n forwards
    ids, n = [5, 6, 7, 8], 200
    out = {}
    for name, fn in (("mlx_lm", lambda: run_mlx_lm(model, tokenizer, ids, n)),
                     ("mlx-sbd k=8", lambda: run_sbd(model, tokenizer, ids, n, 8, 0.0))):
        best = min((lambda r: r["wall"] / r["nfe"])(fn()) for _ in range(reps))
        out[name] = best * 1e3
    return out


def run_mlx_lm(model, tokenizer, ids, max_tokens):
    tic, last = time.perf_counter(), None
    for last in mlx_lm_stream_generate(model.lm, tokenizer, mx.array(ids), max_tokens=max_tokens):
        pass
    return {"tokens": last.generation_tokens, "tps": last.generation_tps, "wall": time.perf_counter() - tic,
            "nfe": last.generation_tokens, "start": tic}


def run_sbd(model, tokenizer, ids, max_tokens, k, gamma, ntp_first=True):
    tic, last = time.perf_counter(), None
    for last in mlx_sbd.stream_generate(model, tokenizer, ids, max_tokens=max_tokens, block_size=k, gamma=gamma,
                                        ntp_first=ntp_first):
        pass
    return {"tokens": last.generation_tokens, "tps": last.generation_tps, "wall": time.perf_counter() - tic,
            "nfe": last.nfe, "start": tic}


def summarize(name, k, gamma, rounds: list) -> dict:
    """One table row from a setting's runs (rounds x prompts). Greedy decoding repeats itself, so tokens and
    forwards are those of one round; tokens/s is per round (tps_rounds) and over all rounds (tps)."""
    def gen_time(runs):  # generation time without prefill; a run may stop at once (EOS)
        return sum(r["tokens"] / r["tps"] for r in runs if r["tokens"])

    tokens = [sum(r["tokens"] for r in runs) for runs in rounds]
    nfe = [sum(r["nfe"] for r in runs) for runs in rounds]
    times = [gen_time(runs) for runs in rounds]
    return {"engine": name, "block_size": k, "gamma": gamma, "tokens": tokens[0], "nfe": nfe[0],
            "tokens_per_forward": tokens[0] / nfe[0], "tps": sum(tokens) / sum(times) if sum(times) else 0.0,
            "tps_rounds": [n / t if t else 0.0 for n, t in zip(tokens, times)],
            "ms_per_forward": 1e3 * sum(times) / sum(nfe),
            "wall": sum(r["wall"] for runs in rounds for r in runs), "runs": rounds}


@click.command()
@click.option("--model", default=None, help="Model reference (default: built-in SmolLM2-135M-Instruct).")
@click.option("--adapter-path", default=None)
@click.option("--block-sizes", default="1,4,8,16", show_default=True)
@click.option("--gammas", default="0,0.1,0.35,0.6", show_default=True)
@click.option("--max-tokens", default=128, show_default=True)
@click.option("--prompts", "n_prompts", default=len(PROMPTS), show_default=True,
              help="How many of the built-in prompts.")
@click.option("--rounds", default=3, show_default=True, help="Interleaved rounds over all settings (see above).")
@click.option("--ntp-first/--masked-first", default=True, show_default=True,
              help="Each block's first open token from the causal prediction (the default decoding) or its mask.")
@click.option("--out", default="results/bench_decode.json", show_default=True)
def main(model, adapter_path, block_sizes, gammas, max_tokens, n_prompts, rounds, ntp_first, out):
    sbd_model, tokenizer = mlx_sbd.load(model, adapter_path=adapter_path)
    prompts = [encode_prompt(tokenizer, p) for p in PROMPTS[:n_prompts]]
    ks = [int(k) for k in block_sizes.split(",")]
    gs = [float(g) for g in gammas.split(",")]
    settings = [("mlx_lm", 1, None)] + [("mlx-sbd", k, g) for k in ks for g in (gs if k > 1 else [0.0])]

    run_sbd(sbd_model, tokenizer, prompts[0], 8, max(ks), gs[0])  # warm-up (allocations, kernels)
    forward_times = {n: time_forward(sbd_model, n) for n in tqdm([1, 2, 4, 8, 16, 32], desc="time(k)")}
    overhead = host_overhead()

    runs = {s: [[] for _ in range(rounds)] for s in settings}  # runs[setting][round] = one run per prompt
    with tqdm(total=rounds * len(prompts) * len(settings), desc="decoding") as bar:
        for rnd in range(rounds):
            for ids in prompts:
                for name, k, g in settings:
                    run = (run_mlx_lm(sbd_model, tokenizer, ids, max_tokens) if name == "mlx_lm"
                           else run_sbd(sbd_model, tokenizer, ids, max_tokens, k, g, ntp_first))
                    runs[name, k, g][rnd].append(run)
                    bar.update()

    rows = [summarize(name, k, g, runs[name, k, g]) for name, k, g in settings]
    base = rows[0]
    for r in rows:
        r["speedup_rounds"] = [tps / base_tps for tps, base_tps in zip(r["tps_rounds"], base["tps_rounds"])]
        r["speedup_vs_mlx_lm"] = statistics.median(r["speedup_rounds"])
    print(f"\nmachine: {machine()}\ndtype: {sbd_model.lm.model.embed_tokens.weight.dtype}")
    print("time(k) ms: " + ", ".join(f"k={n}: {t * 1e3:.1f}" for n, t in forward_times.items()))
    eq16 = {f"k={k},l={l}": eq16_speedup(forward_times, k, l) for k in (4, 8, 16) for l in (1, 2, 4) if l <= k}
    print("Eq. 16 prediction from time(k) (l = forwards per block): "
          + ", ".join(f"{key}: {v:.2f}x" for key, v in eq16.items()))
    print("host overhead per forward (tiny model), ms: " + ", ".join(f"{k}: {v:.2f}" for k, v in overhead.items()))
    print(f"\n{rounds} rounds; speedup = median over rounds of tok/s over mlx_lm's in the same round [min-max]")
    print(f"{'engine':8} {'k':>3} {'gamma':>5} {'tokens':>6} {'NFE':>5} {'tok/fwd':>7} {'ms/fwd':>7} {'tok/s':>7} "
          f"{'speedup':>7} {'range':>11} {'Eq.16':>6}")
    for r in rows:
        k = r["block_size"]
        if r["engine"] == "mlx-sbd" and k > 1 and 2 * k in forward_times and k in forward_times:
            r["eq16"] = eq16_speedup(forward_times, k, k / r["tokens_per_forward"])  # l = forwards per block
        predicted = f"{r['eq16']:6.2f}" if "eq16" in r else "     -"
        g = "-" if r["gamma"] is None else f"{r['gamma']:.2f}"
        print(f"{r['engine']:8} {k:>3} {g:>5} {r['tokens']:>6} {r['nfe']:>5} {r['tokens_per_forward']:>7.2f} "
              f"{r['ms_per_forward']:>7.1f} {r['tps']:>7.2f} {r['speedup_vs_mlx_lm']:>6.2f}x "
              f"{min(r['speedup_rounds']):>5.2f}-{max(r['speedup_rounds']):.2f} {predicted}")
    save({"machine": machine(), "model": model or "built-in SmolLM2-135M-Instruct", "adapter": adapter_path,
          "max_tokens": max_tokens, "rounds": rounds, "ntp_first": ntp_first, "time_k": forward_times, "eq16": eq16,
          "host_overhead_ms": overhead, "rows": rows}, out)


if __name__ == "__main__":
    from mlx_sbd.backend import preload_openblas_and_reexec

    preload_openblas_and_reexec()
    main()
