"""Per-forward host overhead of the decode loops on a model so small that compute is negligible (1 layer, hidden 32):
what remains is Python, graph building and the host syncs. mlx_lm's generate_step (one token per forward, pipelined
with async_eval) against mlx-sbd's verified loop (a gated adapter with random weights, block of 4 and 8, the default
draft policy) alone ("loop only": decode.decode_steps, as generate_step is mlx_lm's loop alone) and through
stream_generate (which adds detokenizing and response objects, as mlx_lm's stream_generate does), its
block_size=1 path and the lossy loop. Rounds are interleaved; the table gives the median and range over rounds of
ms per forward, and the difference to mlx_lm's in the same round, and the best round of each (timeit's rule: on a
machine that other tenants slow down at times, the fastest round is the least disturbed, so best minus best is
the steadiest estimate of the difference). Saves JSON.

    python scripts/bench_overhead.py --rounds 7
"""

import statistics
import sys
import tempfile
import time
from pathlib import Path

import click
import mlx.core as mx
from mlx.utils import tree_flatten
from mlx_lm.generate import generate_step

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, save  # noqa: E402

import mlx_sbd  # noqa: E402
from mlx_sbd.adapter import base_layers, make_trainable, save_adapter  # noqa: E402
from mlx_sbd.decode import decode_steps, make_prompt_cache  # noqa: E402
from mlx_sbd.loading import load_model  # noqa: E402
from mlx_sbd.tiny import make_tiny_model  # noqa: E402


def tiny_gated(folder: Path):
    base = make_tiny_model(folder / "base", hidden_size=32, num_hidden_layers=1, intermediate_size=64,
                           num_attention_heads=2, num_key_value_heads=1)
    model = load_model(base)
    make_trainable(model, "lora", -1, {"rank": 4, "scale": 10.0, "dropout": 0.0}, gated=True)
    model.lm.load_weights([(k, mx.random.normal(v.shape) * 0.1) for k, v in
                           tree_flatten(model.lm.trainable_parameters())], strict=False)
    save_adapter(model, folder / "adapter", {"fine_tune_type": "lora", "gated": True, "num_layers": 1,
                                             "lora_parameters": {"rank": 4, "scale": 10.0, "dropout": 0.0}})
    return mlx_sbd.load(base, adapter_path=folder / "adapter")


def per_forward_ms(fn) -> tuple:
    """(wall ms, CPU ms) per forward. CPU time (all threads of this process) counts only time spent running, so on
    a machine shared with other jobs it stays close to what a quiet machine measures, where wall time does not."""
    tic, cpu = time.perf_counter(), time.process_time()
    nfe = fn()
    return 1e3 * (time.perf_counter() - tic) / nfe, 1e3 * (time.process_time() - cpu) / nfe


@click.command()
@click.option("--tokens", default=300, show_default=True)
@click.option("--rounds", default=7, show_default=True)
@click.option("--out", default="results/bench_overhead.json", show_default=True)
def main(tokens, rounds, out):
    with tempfile.TemporaryDirectory() as d:
        model, tokenizer = tiny_gated(Path(d))
    tokenizer.eos_token_ids = set()  # never stop early: measure exactly `tokens` tokens
    ids = [5, 6, 7, 8]

    def mlx_lm_run():
        n = 0
        with base_layers(model) as lm:  # the base as mlx_lm loads it: our idle gated layers count as our overhead
            for _ in generate_step(mx.array(ids), lm, max_tokens=tokens):
                n += 1
        return n

    def sbd_run(**kw):
        def run():
            last = None
            for last in mlx_sbd.stream_generate(model, tokenizer, ids, max_tokens=tokens, **kw):
                pass
            return last.nfe
        return run

    def loop_run(block_size):
        """The verified loop alone (decode.decode_steps, what stream_generate iterates), without stream_generate's
        detokenizing and responses: what mlx_lm's generate_step row is, for mlx_lm."""
        def run():
            cache, last = make_prompt_cache(model), None
            for last in decode_steps(model, cache, ids, block_size=block_size, gamma=float("inf"), select=None,
                                     sample=None, max_tokens=tokens, max_length=1 << 30, eos_ids=[], draft="auto"):
                pass
            return last.nfe
        return run

    engines = {"mlx_lm generate_step": mlx_lm_run, "mlx-sbd block_size=1": sbd_run(block_size=1),
               "mlx-sbd verified k=4 loop only": loop_run(4), "mlx-sbd verified k=8 loop only": loop_run(8),
               "mlx-sbd verified k=4": sbd_run(block_size=4, gamma=float("inf")),
               "mlx-sbd verified k=8": sbd_run(block_size=8, gamma=float("inf")),
               "mlx-sbd verified k=8 gamma=0.35": sbd_run(block_size=8, gamma=0.35),
               "mlx-sbd lossy k=8 gamma=0": sbd_run(block_size=8, gamma=0.0, verify=False)}
    for fn in engines.values():  # warm-up
        fn()
    ms = {name: [] for name in engines}
    cpu = {name: [] for name in engines}
    for _ in range(rounds):
        for name, fn in engines.items():
            wall, used = per_forward_ms(fn)
            ms[name].append(wall)
            cpu[name].append(used)
    print(f"\nmachine: {machine()}\n1-layer model (hidden 32), {tokens} tokens, {rounds} interleaved rounds")
    print(f"{'engine':34} {'ms/forward':>10} {'range':>13} {'minus mlx_lm':>13} {'best':>6} {'minus best':>11} "
          f"{'CPU ms/fwd':>11} {'minus mlx_lm':>13}")
    rows = []
    for name in engines:
        diff = [v - b for v, b in zip(ms[name], ms["mlx_lm generate_step"])]
        cpu_diff = [v - b for v, b in zip(cpu[name], cpu["mlx_lm generate_step"])]
        best = min(ms[name]) - min(ms["mlx_lm generate_step"])
        rows.append({"engine": name, "ms_per_forward": ms[name], "minus_mlx_lm": diff, "best_minus_best": best,
                     "cpu_ms_per_forward": cpu[name], "cpu_minus_mlx_lm": cpu_diff})
        print(f"{name:34} {statistics.median(ms[name]):>10.3f} {min(ms[name]):>6.3f}-{max(ms[name]):<6.3f} "
              f"{statistics.median(diff):>+12.3f} {min(ms[name]):>6.3f} {best:>+11.3f} "
              f"{statistics.median(cpu[name]):>11.3f} {statistics.median(cpu_diff):>+12.3f}")
    save({"machine": machine(), "tokens": tokens, "rounds": rounds, "rows": rows}, out)


if __name__ == "__main__":
    from mlx_sbd.backend import preload_openblas_and_reexec

    preload_openblas_and_reexec()
    main()
