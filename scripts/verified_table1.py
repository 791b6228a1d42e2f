"""Table 1 with lossless SBD: an NTP model, a gated SBD LoRA on top of it, verified decoding against NTP decoding.

The tiny llama and data of repro_table1.py (arithmetic + reverse, char tokenizer). Stages, each resumable:
1. an NTP full fine-tune of the random tiny llama (the "user's model");
2. that model fused into a model folder, and a gated SBD LoRA trained on it (the causal path stays the NTP model);
3. every held-out prompt decoded greedily: the NTP model one token per forward (the reference), and verified SBD
   decoding with the gated adapter at each k and gamma. Verified decoding must give the reference's tokens exactly;
   the table gives how many outputs are identical, exact-match accuracy, forwards (NFE) and NFE speedup.
`--stage ntp|sbd` trains one stage and stops (so two processes can share the cores), `--stage all` does everything.

    python scripts/verified_table1.py --work runs/vtable1 --iters 800
"""

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, save  # noqa: E402
from repro_table1 import fine_tune, prepare  # noqa: E402

from mlx_sbd import load  # noqa: E402
from mlx_sbd.fuse import fuse  # noqa: E402
from mlx_sbd.generate import stream_generate  # noqa: E402
from mlx_sbd.tasks import exact_match  # noqa: E402
from mlx_sbd.train import TrainConfig, train  # noqa: E402


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default="runs/vtable1")
    p.add_argument("--out", default="results/verified_table1.json")
    p.add_argument("--n-train", type=int, default=6000)
    p.add_argument("--n-test", type=int, default=100)
    p.add_argument("--iters", type=int, default=800, help="steps of the NTP stage (and of the gated one unless --sbd-iters)")
    p.add_argument("--sbd-iters", type=int, default=None, help="steps of the gated SBD stage. Default: --iters")
    p.add_argument("--sbd-lr", type=float, default=None, help="peak learning rate of the gated stage. Default: --lr")
    p.add_argument("--targets", choices=("data", "soft", "base"), default="soft",
                   help="what masked positions learn (TrainConfig.targets): the data token, or the NTP model's own "
                   "next-token distribution (soft) or argmax (base), which is what the verifier accepts")
    p.add_argument("--noise", choices=("uniform", "full"), default="full", help="TrainConfig.noise")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--hidden-size", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--block-size-max", type=int, default=16)
    p.add_argument("--lora-rank", type=int, default=32)
    p.add_argument("--ks", default="4,8,16")
    p.add_argument("--gammas", default="0.5,2,inf")
    p.add_argument("--layouts", default="linear,predraft", help="verified layouts to decode with (drafts from the "
                   "mask block only: draft=sbd, so the numbers are the adapter's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stage", choices=("ntp", "sbd", "all"), default="all")
    args = p.parse_args()
    args.pretrain_iters = 0  # repro_table1.prepare's settings
    return args


def gated_stage(ntp_model: Path, data: Path, adapter_path: Path, args):
    iters, lr = args.sbd_iters or args.iters, args.sbd_lr or args.lr
    cfg = TrainConfig(model=str(ntp_model), data=str(data), adapter_path=str(adapter_path), fine_tune_type="lora",
                      num_layers=-1, lora_parameters={"rank": args.lora_rank, "scale": 20.0, "dropout": 0.0},
                      objective="sbd", gated=True, iters=iters, batch_size=args.batch_size, targets=args.targets,
                      noise=args.noise, learning_rate=lr, min_learning_rate=lr / 20, warmup=iters // 20,
                      weight_decay=0.0, block_size_max=args.block_size_max, mask_prompt=True, steps_per_report=50,
                      steps_per_eval=max(iters // 4, 1), val_batches=-1, steps_per_save=100, seed=args.seed,
                      resume=(adapter_path / "checkpoints").is_dir(), compile=True)
    model, tokenizer = load(ntp_model, adapter_path=False)
    tic = time.perf_counter()
    train(cfg, model, tokenizer)
    print(f"gated SBD stage: {time.perf_counter() - tic:.0f} s")


def decode(model, tokenizer, prompt: str, budget: int, **kw):
    out, last = [], None
    for last in stream_generate(model, tokenizer, prompt, max_tokens=budget, chat_template=False, **kw):
        out += last.tokens
    return out, last


def main():
    args = parse_args()
    work = Path(args.work)
    base, data, tests = prepare(work, args)
    if args.stage in ("ntp", "all"):
        fine_tune(base, data, work / "ntp", "ntp", args, args.iters)
    ntp_model = work / "ntp_model"
    if args.stage in ("sbd", "all"):
        if not (ntp_model / "config.json").is_file():
            fuse(base, work / "ntp", ntp_model)
        gated_stage(ntp_model, data, work / "gated", args)
    if args.stage != "all":
        return

    ntp, tokenizer = load(ntp_model, adapter_path=False)
    sbd, _ = load(ntp_model, adapter_path=work / "gated")
    settings = [(k, float(g), layout) for layout in args.layouts.split(",") for k in (int(x) for x in args.ks.split(","))
                for g in args.gammas.split(",")]
    rows = {s: {"identical": 0, "correct": 0, "nfe": 0, "tokens": 0, "drafted": 0, "accepted": 0} for s in settings}
    ref_row = {"correct": 0, "nfe": 0, "tokens": 0}
    n = 0
    for task, examples in tests.items():
        budget = max(len(e["completion"]) for e in examples) + 8
        for ex in examples:
            ref, last = decode(ntp, tokenizer, ex["prompt"], budget, block_size=1)
            ref_text = tokenizer.decode(ref)
            ref_row["correct"] += exact_match(ref_text, ex["completion"])
            ref_row["nfe"] += last.nfe
            ref_row["tokens"] += len(ref)
            for k, g, layout in settings:
                got, last = decode(sbd, tokenizer, ex["prompt"], budget, block_size=k, gamma=g, draft="sbd",
                                   layout=layout)
                r = rows[k, g, layout]
                r["identical"] += got == ref
                r["correct"] += exact_match(tokenizer.decode(got), ex["completion"])
                r["nfe"] += last.nfe
                r["tokens"] += len(got)
                r["drafted"] += last.drafted
                r["accepted"] += last.accepted
            n += 1
    print(f"\nmachine: {machine()}\n{n} held-out prompts ({', '.join(tests)}), greedy")
    lines = ["| decoding | identical to NTP | exact match | NFE | tokens/forward | draft acceptance | NFE speedup |",
             "|---|---|---|---|---|---|---|",
             f"| NTP model, one token per forward | - | {100 * ref_row['correct'] / n:.1f}% | {ref_row['nfe']} | "
             f"{ref_row['tokens'] / ref_row['nfe']:.2f} | - | 1.00x |"]
    for (k, g, layout), r in rows.items():
        lines.append(f"| verified {layout}, gated adapter, k={k}, gamma={g:g} | {r['identical']}/{n} | "
                     f"{100 * r['correct'] / n:.1f}% | {r['nfe']} | {r['tokens'] / r['nfe']:.2f} | "
                     f"{100 * r['accepted'] / max(r['drafted'], 1):.1f}% | {ref_row['nfe'] / r['nfe']:.2f}x |")
    table = "\n".join(lines)
    print(table)
    save({"machine": machine(), "settings": vars(args), "reference": ref_row,
          "rows": [{"block_size": k, "gamma": g, "layout": layout, **r} for (k, g, layout), r in rows.items()], "markdown": table}, args.out)


if __name__ == "__main__":
    from mlx_sbd.backend import preload_openblas_and_reexec

    preload_openblas_and_reexec()
    main()
