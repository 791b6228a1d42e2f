"""Data-parallel training speed: `mlx-sbd train` on 1 vs N local processes (ring back-end on 127.0.0.1).

Trains a tiny random llama on the reverse task (or, with --config, the model, data and settings of a training
YAML such as the SmolLM2 adapter recipe's) with the same global batch in every run, and reports steps/s and
tokens/s (real sequence tokens of the global batch, counted once) from rank 0's train_log.jsonl, leaving out
the first report (warm-up). Prints a table and saves the raw numbers as JSON.

Caveat: N processes on one machine share its cores and memory bandwidth (each rank gets cores / N BLAS threads
unless --blas-threads says otherwise), so this is not the speedup of N Macs. On a 2-core machine the ratio mixes
the cost of sharding and all_sum over loopback with the fact that one eager process of a tiny model keeps
about one core busy while 2 ranks keep both busy; the speedup of N Macs has to be measured on N Macs.

    python scripts/bench_distributed.py                      # 1 vs 2 processes, tiny model, 20 steps
    python scripts/bench_distributed.py --processes 1,2,4 --batch-size 16 --hidden-size 256
    python scripts/bench_distributed.py --config mlx_sbd/adapters/smollm2-135m-instruct-sbd/train.yaml \
        --iters 6 --compile                                  # SmolLM2, the recipe's stage 1
"""

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click
import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, save  # noqa: E402

from mlx_sbd.tasks import alphabet, write_dataset  # noqa: E402
from mlx_sbd.tiny import make_tiny_model  # noqa: E402
from mlx_sbd.train import TRAIN_LOG  # noqa: E402


def free_port(n: int) -> int:
    """A starting port p with p .. p+n-1 free on 127.0.0.1 (the ring back-end listens on one per rank)."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        try:
            for p in range(port + 1, port + n):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", p))
            return port
        except OSError:
            continue


def run(n: int, train_args: list, adapter_path: Path, threads: int, timeout: int) -> list:
    """Train on n local ranks; returns rank 0's training reports (one per step). The ranks get the ring
    back-end's environment (MLX_HOSTFILE, MLX_RANK) directly, as mlx.launch would set it, but without the
    launcher process, whose output-polling loop would take a good part of one of this machine's two cores."""
    command = [sys.executable, "-m", "mlx_sbd", "train", "--adapter-path", str(adapter_path), *train_args]
    env = dict(os.environ, OPENBLAS_NUM_THREADS=str(threads))
    if n > 1:
        port = free_port(n)
        hostfile = adapter_path.parent / f"hosts-{n}.json"
        hostfile.write_text(json.dumps([[f"127.0.0.1:{port + rank}"] for rank in range(n)]))
        env["MLX_HOSTFILE"] = str(hostfile)
    outputs = [open(adapter_path.parent / f"rank{rank}-of-{n}.log", "w+") for rank in range(n)]
    procs = [subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                              env=dict(env, MLX_RANK=str(rank))) for rank, out in enumerate(outputs)]
    deadline = time.monotonic() + timeout
    # Stop at the first failed rank: the others would wait for it in all_sum until the deadline.
    while any(p.poll() is None for p in procs) and not any(p.poll() for p in procs) and time.monotonic() < deadline:
        time.sleep(0.5)
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()
    codes = [p.returncode for p in procs]
    outputs[0].seek(0)
    rank0 = outputs[0].read()
    for out in outputs:
        out.close()
    log = adapter_path / TRAIN_LOG
    if any(codes) or not log.is_file():
        raise SystemExit(f"{n} process(es) failed or timed out (exit codes {codes}); rank 0 said:\n{rank0[-3000:]}")
    return [json.loads(line) for line in log.read_text().splitlines() if '"ntp"' in line]


@click.command()
@click.option("--processes", default="1,2", help="Comma-separated process counts to compare.")
@click.option("--config", default=None, type=click.Path(exists=True, dir_okay=False),
              help="Train with this mlx-sbd train YAML (model, data, LoRA, batch) instead of the tiny model.")
@click.option("--batch-size", default=None, type=int,
              help="Global batch (split over the processes). Default: 8, or the config's.")
@click.option("--iters", default=20, help="Optimizer steps per run (the first is warm-up).")
@click.option("--hidden-size", default=128)
@click.option("--layers", default=4)
@click.option("--blas-threads", default=0, help="BLAS threads per rank. Default: cores / processes.")
@click.option("--compile", "compiled", is_flag=True, help="mx.compile the step (CPU: ~30 s JIT per process first).")
@click.option("--timeout", default=600, help="Seconds per run before giving up.")
@click.option("--out", default="bench_distributed.json")
def main(config, processes, batch_size, iters, hidden_size, layers, blas_threads, compiled, timeout, out):
    counts = [int(n) for n in processes.split(",")]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        common = ["--iters", str(iters), "--steps-per-report", "1", "--save-every", str(10**9), "--warmup", "1",
                  "--steps-per-eval", str(10**9), "--val-batches", "1",
                  *(["--batch-size", str(batch_size)] if batch_size else []), *([] if compiled else ["--no-compile"])]
        if config:
            train_args = ["--config", config, *common]
        else:
            batch_size = batch_size or 8
            base = make_tiny_model(tmp / "base", alphabet=alphabet("reverse"), hidden_size=hidden_size,
                                   num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                   intermediate_size=2 * hidden_size)
            data = write_dataset(tmp / "data", "reverse", 40 * batch_size, batch_size, 1, seed=0)
            train_args = ["--model", str(base), "--data", str(data), "--num-layers", "-1", "--batch-size",
                          str(batch_size), *common]
        for n in counts:
            print(f"training on {n} process(es) ...", flush=True)
            threads = blas_threads or max(1, (os.cpu_count() or 1) // n)
            reports = run(n, train_args, tmp / f"adapters-{n}", threads, timeout)
            steady = reports[1:] or reports
            # Medians: other jobs on a shared machine make single steps several times slower.
            s_per_step = float(np.median([r["s_per_step"] for r in steady]))
            tokens = float(np.median([r["tokens_per_s"] * r["s_per_step"] for r in steady]))  # per global batch
            rows.append({"processes": n, "blas_threads": threads, "steps_per_s": 1 / s_per_step,
                         "tokens_per_s": tokens / s_per_step, "final_ntp": reports[-1]["ntp"], "reports": reports})
    one = rows[0]["steps_per_s"]
    what = f"{config}" if config else f"tiny llama: hidden {hidden_size}, {layers} layers, LoRA all layers"
    print(f"\n{what}; global batch {batch_size or 'of the config'}; {'compiled' if compiled else 'eager'} step; "
          f"{os.cpu_count()} CPU cores")
    print("| processes | BLAS threads each | steps/s (median) | tokens/s | vs first row | final NTP |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['processes']} | {r['blas_threads']} | {r['steps_per_s']:.2f} | {r['tokens_per_s']:.0f} | "
              f"{r['steps_per_s'] / one:.2f}x | {r['final_ntp']:.6f} |")
    print("\nCaveat: all processes share this one machine, so this is not a multi-Mac speedup: the ratio mixes the "
          "cost of sharding + all_sum over loopback with how many of the cores one process manages to keep busy.")
    save({"machine": machine(), "load_average": os.getloadavg(), "batch_size": batch_size, "iters": iters,
          "config": config, "model": None if config else {"hidden_size": hidden_size, "layers": layers},
          "compiled": compiled, "runs": rows}, out)


if __name__ == "__main__":
    main()
