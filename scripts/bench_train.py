"""Benchmark SBD LoRA training speed and memory: SmolLM2-135M-Instruct (or --model), batch B x T tokens.

Trains a few steps on synthetic text cut to exactly T tokens (the doubled SBD input is 2T wide), then prints a
table of seconds per step, tokens/s (real sequence tokens, counted once) and peak memory, and writes the raw
per-report numbers to --out. The first step (mx.compile tracing) is excluded from the averages.

--compare trains, in interleaved rounds of --iters steps each, an NTP LoRA, a gated SBD LoRA (the default: the
clean half once without backprop, the noised half with it; soft targets, and once more with data targets), the same
two with --cache-clean (the clean half kept from the first epoch: the synthetic data is one batch, so every step
after the first, the one excluded, is a later epoch's) and an ungated SBD LoRA on the same batches, and
prints each one's median s/step and peak memory with its ratio to the NTP step of the same round.
"""

import argparse
import json
import sys
import tempfile
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, save  # noqa: E402

from mlx_sbd import load  # noqa: E402
from mlx_sbd.tasks import make_examples  # noqa: E402
from mlx_sbd.train import TRAIN_LOG, TrainConfig, train  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default=None)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--iters", type=int, default=6)
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--num-layers", type=int, default=-1)
    p.add_argument("--grad-checkpoint", action="store_true")
    p.add_argument("--objective", default="sbd", choices=["sbd", "ntp"], help="ntp: the NTP-only baseline (no doubled input)")
    p.add_argument("--ungated", action="store_true", help="SBD the paper's way (LoRA on every row)")
    p.add_argument("--compare", action="store_true", help="NTP vs gated vs ungated SBD in interleaved rounds")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--settings", default=None, help="With --compare: a comma list of the settings to run (default "
                   "all: 'ntp lora', 'sbd gated lora', 'sbd gated lora (data targets)', 'sbd gated lora (clean kept)', "
                   "'sbd gated lora (data targets; clean kept)', 'sbd ungated lora')")
    p.add_argument("--data", default=None, help="A real training folder (e.g. chat rows with prompts) instead of "
                   "synthetic text; sequences are cut at --seq-len, not padded to it")
    p.add_argument("--mask-prompt", action="store_true", help="With --data: no loss on prompts (the gated step "
                   "then skips the noised copies of whole prompt blocks)")
    p.add_argument("--out", default="results/bench_train.json")
    args = p.parse_args()
    if args.compare:
        return compare(args)

    summary = run(args, args.objective, gated=not args.ungated)
    print("\n| machine | batch | s/step | tokens/s | peak GB |\n|---|---|---|---|---|")
    print(f"| {summary['machine']['processor']} x{summary['machine']['cpus']}, {summary['machine']['blas']} | {summary['batch']} | {summary['s_per_step']:.2f} | "
          f"{summary['tokens_per_s']:.0f} | {summary['peak_memory_gb']:.2f} |")
    save(summary, args.out)


def compare(args):
    import statistics

    settings = {"ntp lora": ("ntp", False, None, False), "sbd gated lora": ("sbd", True, None, False),
                "sbd gated lora (data targets)": ("sbd", True, "data", False),
                "sbd gated lora (clean kept)": ("sbd", True, None, True),
                "sbd gated lora (data targets; clean kept)": ("sbd", True, "data", True),
                "sbd ungated lora": ("sbd", False, None, False)}
    if args.settings:
        chosen = [name.strip() for name in args.settings.split(",")]
        settings = {name: settings[name] for name in ["ntp lora"] + [n for n in chosen if n != "ntp lora"]}
    runs = {name: [] for name in settings}
    for _ in range(args.rounds):
        for name, (objective, gated, targets, cache_clean) in settings.items():
            runs[name].append(run(args, objective, gated, targets, cache_clean))
    print(f"\nmachine: {machine()}\ndata: {args.data or 'synthetic text'}, batch {args.batch_size} x {args.seq_len} tokens, LoRA rank {args.lora_rank}, "
          f"layers {args.num_layers}, {args.rounds} interleaved rounds of {args.iters} steps (first step of each excluded)")
    print("| setting | s/step (median) | range | x NTP step | CPU s/step | x NTP | peak GB | x NTP peak |\n"
          "|---|---|---|---|---|---|---|---|")
    rows = []
    for name, rs in runs.items():
        steps = [r["s_per_step"] for r in rs]
        ratio = [r["s_per_step"] / b["s_per_step"] for r, b in zip(rs, runs["ntp lora"])]
        cpu = [r["cpu_s_per_step"] for r in rs]  # the step's work: what wall time is on a quiet machine
        cpu_ratio = [r["cpu_s_per_step"] / b["cpu_s_per_step"] for r, b in zip(rs, runs["ntp lora"])]
        peak = max(r["peak_memory_gb"] for r in rs)
        base_peak = max(r["peak_memory_gb"] for r in runs["ntp lora"])
        rows.append({"setting": name, "s_per_step": steps, "ratio_to_ntp": ratio, "cpu_s_per_step": cpu,
                     "cpu_ratio_to_ntp": cpu_ratio, "peak_memory_gb": peak})
        print(f"| {name} | {statistics.median(steps):.2f} | {min(steps):.2f}-{max(steps):.2f} | "
              f"{statistics.median(ratio):.2f}x | {statistics.median(cpu):.2f} | {statistics.median(cpu_ratio):.2f}x | "
              f"{peak:.2f} | {peak / base_peak:.2f}x |")
    save({"machine": machine(), "data": args.data or "synthetic text", "mask_prompt": args.mask_prompt,
          "batch": [args.batch_size, args.seq_len], "rows": rows, "runs": runs}, args.out)


def run(args, objective: str, gated: bool, targets=None, cache_clean: bool = False) -> dict:
    import mlx.core as mx

    mx.reset_peak_memory()
    model, tokenizer = load(args.model, adapter_path=False)
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(args.data) if args.data else Path(tmp) / "data"
        if not args.data:
            data.mkdir()
            # Long enough that every sequence is cut to exactly seq_len tokens.
            examples = make_examples("arithmetic", 40 * args.batch_size, seed=0)
            texts = [" ".join(e["prompt"] + e["completion"] for e in examples[i : i + 40])
                     for i in range(0, len(examples), 40)]
            (data / "train.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
        cfg = TrainConfig(
            model=args.model, data=str(data), adapter_path=str(Path(tmp) / "adapters"), iters=args.iters,
            batch_size=args.batch_size, max_seq_length=args.seq_len, num_layers=args.num_layers,
            lora_parameters={"rank": args.lora_rank, "scale": 20.0, "dropout": 0.0}, steps_per_report=1,
            steps_per_save=10**9, steps_per_eval=10**9, grad_checkpoint=args.grad_checkpoint, warmup=1,
            objective=objective, gated=gated, mask_prompt=args.mask_prompt, targets=targets, cache_clean=cache_clean,
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the truncation warning is the point here
            train(cfg, model, tokenizer)
        reports = [json.loads(l) for l in open(Path(tmp) / "adapters" / TRAIN_LOG) if '"ntp"' in l]
    steady = reports[1:] or reports
    mean = lambda key: sum(r[key] for r in steady) / len(steady)
    summary = {
        "machine": machine(),
        "model": args.model or "SmolLM2-135M-Instruct (built-in)",
        "objective": objective, "gated": gated, "targets": targets or "default", "cache_clean": cache_clean,
        "batch": f"{args.batch_size} x {args.seq_len} tokens"
        + (f" (doubled input {2 * args.seq_len})" if objective == "sbd" else ""),
        "lora": f"rank {args.lora_rank}, layers {args.num_layers}", "grad_checkpoint": args.grad_checkpoint,
        "s_per_step": mean("s_per_step"), "cpu_s_per_step": mean("cpu_s_per_step"), "tokens_per_s": mean("tokens_per_s"),
        "peak_memory_gb": max(r["peak_memory_gb"] for r in reports), "reports": reports,
    }
    return summary


if __name__ == "__main__":
    from mlx_sbd.backend import preload_openblas_and_reexec

    preload_openblas_and_reexec()
    main()
