"""Small-scale reproduction of the SBD paper's Table 1: NTP fine-tune vs SBD fine-tune of one tiny llama.

From one random tiny llama (char-level tokenizer, mlx_sbd.tiny) two models are fine-tuned on the same mixed
`arithmetic` + `reverse` training set (mlx_sbd.tasks) with the same steps, batch, lr and seed: one with the NTP
loss only (TrainConfig objective="ntp"), one with the SBD loss. Held-out prompts of each task are then decoded
greedily and scored by exact match: NTP decoding (block_size=1) of both models, and SBD decoding of the SBD model
over gamma x k. NFE is the sum of forward passes over the test set; speedup = NFE of NTP decoding of the NTP
model / NFE of the row. Output: a markdown table, <out>/table1.json and an accuracy-vs-NFE plot <out>/table1.png.

With --pretrain-iters N the shared starting point is not random: the tiny llama is first trained with the NTP
loss for N steps on the same task families at other sizes (PRETRAIN_SETTINGS; no test prompt among them), and
both fine-tunes start from those weights (TrainConfig.init_adapter). This is the paper's setting: NTP and SBD
fine-tunes of one pretrained NTP model, so the SBD fine-tune adapts a model that already predicts the next token.

Interrupted runs resume: training checkpoints live in <work>/{ntp,sbd}, finished evaluation rows in
<work>/rows.json; rerun the same command to continue. A different set of settings needs a different --work.
The two fine-tunes are independent: `--train-only ntp` and `--train-only sbd` train one each, so two processes
with OPENBLAS_NUM_THREADS=1 use two cores (measured on 2 cores: 1.04 s/step each in parallel against 0.99 s/step
for one process alone, so nearly twice the throughput); the command without it then only evaluates.
"""

import argparse
import importlib.util
import json
import random
import time
from pathlib import Path

from mlx_sbd import load
from mlx_sbd.errors import SBDError
from mlx_sbd.generate import stream_generate
from mlx_sbd.tasks import alphabet, exact_match, make_examples
from mlx_sbd.tiny import make_tiny_model
from mlx_sbd.train import TrainConfig, train

# Short fixed-length sequences: 3-digit operands (3 column steps, 34 answer chars) and 8 letters. Fixed lengths put
# every lookup at a fixed offset, which a tiny model learns in a few hundred steps.
TASK_SETTINGS = {"arithmetic": dict(min_digits=3, max_digits=3), "reverse": dict(min_len=8, max_len=8)}
# Pretraining (--pretrain-iters): the same families over a wider range of sizes, so the fine-tune still teaches
# something (the fixed 3-digit / 8-letter offsets) while the base already knows the format and the column steps.
PRETRAIN_SETTINGS = {"arithmetic": dict(min_digits=1, max_digits=4), "reverse": dict(min_len=4, max_len=12)}


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default="runs/table1", help="checkpoints, data and finished rows (resumable)")
    p.add_argument("--out", default="results", help="folder for table1.json and table1.png")
    p.add_argument("--n-train", type=int, default=6000, help="training examples per task")
    p.add_argument("--n-test", type=int, default=100, help="held-out test prompts per task")
    p.add_argument("--iters", type=int, default=1500)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--hidden-size", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--block-size-max", type=int, default=16)
    p.add_argument("--gammas", default="0,0.1,0.35,0.6,1.0")
    p.add_argument("--ks", default="8,16")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--pretrain-iters", type=int, default=0,
                   help="NTP-pretrain the tiny base this many steps first (0: fine-tune from random weights)")
    p.add_argument("--train-only", choices=("ntp", "sbd"),
                   help="train only this fine-tune (after the pretraining) and exit; with more than one core, run "
                        "the two in parallel (OPENBLAS_NUM_THREADS=1 each), then the plain command evaluates")
    return p.parse_args()


def settings_of(args) -> dict:
    keys = ("n_train", "n_test", "iters", "batch_size", "lr", "hidden_size", "layers", "block_size_max", "seed")
    settings = {**{k: getattr(args, k) for k in keys}, "tasks": TASK_SETTINGS}
    if args.pretrain_iters:  # absent otherwise, so work folders of earlier runs still resume
        settings.update(pretrain_iters=args.pretrain_iters, pretrain_tasks=PRETRAIN_SETTINGS)
    return settings


def prepare(work: Path, args) -> tuple:
    """Data folder (mixed train, small valid) + per-task test sets + the base model; checks settings on resume."""
    settings = settings_of(args)
    saved = work / "settings.json"
    if saved.is_file() and json.loads(saved.read_text()) != settings:
        raise SBDError(f"{work} holds a run with other settings; pass a new --work or delete {work}")
    work.mkdir(parents=True, exist_ok=True)
    saved.write_text(json.dumps(settings, indent=2))

    train_set, valid_set, tests = [], [], {}
    for i, (task, kw) in enumerate(TASK_SETTINGS.items()):
        ex = make_examples(task, args.n_train + 32 + args.n_test, seed=args.seed * 100 + i, **kw)
        train_set += ex[: args.n_train]
        valid_set += ex[args.n_train : args.n_train + 32]
        tests[task] = ex[args.n_train + 32 :]
    random.Random(args.seed).shuffle(train_set)
    data = write_data(work / "data", train_set, valid_set)

    chars = "".join(sorted(set(alphabet("arithmetic") + alphabet("reverse"))))
    base = work / "base"
    if not (base / "config.json").is_file():
        h = args.hidden_size
        make_tiny_model(base, alphabet=chars, hidden_size=h, num_hidden_layers=args.layers, num_attention_heads=4,
                        num_key_value_heads=2, intermediate_size=2 * h, max_position_embeddings=256, seed=args.seed)
    if args.pretrain_iters:
        held_out = {e["prompt"] for ex in tests.values() for e in ex}
        pre_train, pre_valid = [], []
        for i, (task, kw) in enumerate(PRETRAIN_SETTINGS.items()):
            ex = [e for e in make_examples(task, args.n_train + 32, seed=args.seed * 100 + 50 + i, **kw)
                  if e["prompt"] not in held_out]
            pre_train += ex[32:]
            pre_valid += ex[:32]
        random.Random(args.seed + 1).shuffle(pre_train)
        write_data(work / "pretrain_data", pre_train, pre_valid)
    return base, data, tests


def write_data(folder: Path, train_set: list, valid_set: list) -> Path:
    """A training data folder: train.jsonl and valid.jsonl."""
    folder.mkdir(exist_ok=True)
    for name, rows in (("train", train_set), ("valid", valid_set)):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def fine_tune(base: Path, data: Path, adapter_path: Path, objective: str, args, iters: int, init=None):
    """Full fine-tune with `objective` (from the weights of the finished run `init`, if given), resuming from the
    latest checkpoint; returns (model, tokenizer)."""
    cfg = TrainConfig(model=str(base), data=str(data), adapter_path=str(adapter_path), fine_tune_type="full",
                      init_adapter=str(init) if init else None,
                      objective=objective, iters=iters, batch_size=args.batch_size, learning_rate=args.lr,
                      min_learning_rate=args.lr / 20, warmup=iters // 20, weight_decay=0.0,
                      block_size_max=args.block_size_max, mask_prompt=True, steps_per_report=50,
                      steps_per_eval=max(iters // 4, 1), val_batches=-1, steps_per_save=100, seed=args.seed,
                      resume=True, compile=True)
    tic = time.perf_counter()
    model, tokenizer = load(base)
    train(cfg, model, tokenizer)
    print(f"{objective} fine-tune: {time.perf_counter() - tic:.0f} s")
    return model, tokenizer


def decode_all(model, tokenizer, examples: list, block_size: int, gamma: float) -> dict:
    """Greedy decoding of every test prompt -> exact-match accuracy and total NFE, with the paper's decode loop
    (every block position from its mask: ntp_first=False), which the table reproduces."""
    budget = max(len(e["completion"]) for e in examples) + 8  # room for EOS and a little overrun
    correct = nfe = 0
    for ex in examples:
        text, last = "", None
        for last in stream_generate(model, tokenizer, ex["prompt"], max_tokens=budget, block_size=block_size,
                                    gamma=gamma, chat_template=False, ntp_first=False):
            text += last.text
        correct += exact_match(text, ex["completion"])
        nfe += last.nfe
    return {"accuracy": correct / len(examples), "nfe": nfe}


def row_specs(args) -> list:
    """(name, model, block_size, gamma); the NTP-model NTP row comes first: it is the speedup reference."""
    specs = [("NTP model, NTP decoding", "ntp", 1, 0.0), ("SBD model, NTP decoding", "sbd", 1, 0.0)]
    for k in (int(x) for x in args.ks.split(",")):
        specs += [(f"SBD model, k={k}, gamma={g:g}", "sbd", k, g) for g in (float(x) for x in args.gammas.split(","))]
    return specs


def evaluate_rows(models: dict, tests: dict, work: Path, args) -> list:
    """Evaluate every row once; finished rows are saved after each one and skipped on a rerun."""
    path = work / "rows.json"
    done = json.loads(path.read_text()) if path.is_file() else {}
    rows = []
    for name, which, k, g in row_specs(args):
        if name not in done:
            tic = time.perf_counter()
            per_task = {t: decode_all(*models[which], ex, k, g) for t, ex in tests.items()}
            done[name] = {"name": name, "model": which, "block_size": k, "gamma": g if k > 1 else None,
                          "tasks": per_task, "seconds": time.perf_counter() - tic}
            path.write_text(json.dumps(done, indent=2))
            print(f"{name}: " + ", ".join(f"{t} {r['accuracy']:.2f} ({r['nfe']} NFE)" for t, r in per_task.items()))
        rows.append(done[name])
    n = sum(len(ex) for ex in tests.values())
    for r in rows:  # totals over all test prompts (the tasks have equally many)
        r["accuracy"] = sum(r["tasks"][t]["accuracy"] * len(ex) for t, ex in tests.items()) / n
        r["nfe"] = sum(res["nfe"] for res in r["tasks"].values())
    for r in rows:
        for t, res in r["tasks"].items():
            res["speedup"] = rows[0]["tasks"][t]["nfe"] / res["nfe"]
        r["speedup"] = rows[0]["nfe"] / r["nfe"]
    return rows


def markdown(rows: list, tasks: list) -> str:
    head = "| model / decoding | " + " | ".join(f"{t} acc | {t} NFE | {t} speedup" for t in tasks) + " | all acc | all speedup |"
    lines = [head, "|" + "---|" * (2 + 3 * len(tasks) + 1)]
    for r in rows:
        cells = [f"{r['tasks'][t]['accuracy'] * 100:.1f} | {r['tasks'][t]['nfe']} | {r['tasks'][t]['speedup']:.2f}x"
                 for t in tasks]
        lines.append(f"| {r['name']} | " + " | ".join(cells) + f" | {r['accuracy'] * 100:.1f} | {r['speedup']:.2f}x |")
    return "\n".join(lines)


def have_matplotlib() -> bool:
    """The plot needs matplotlib, which is optional (the `bench` extra)."""
    return importlib.util.find_spec("matplotlib") is not None


def plot(rows: list, tasks: list, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(tasks), figsize=(6 * len(tasks), 4.5))
    for ax, t in zip(axes, tasks):
        for r, marker, label in ((rows[0], "*", "NTP model, NTP decoding"), (rows[1], "s", "SBD model, NTP decoding")):
            ax.scatter(r["tasks"][t]["nfe"], 100 * r["tasks"][t]["accuracy"], marker=marker, s=120, label=label,
                       zorder=3)
        for k in sorted({r["block_size"] for r in rows if r["block_size"] > 1}):
            curve = [r for r in rows if r["block_size"] == k]
            xs = [r["tasks"][t]["nfe"] for r in curve]
            ys = [100 * r["tasks"][t]["accuracy"] for r in curve]
            ax.plot(xs, ys, "o-", label=f"SBD model, k={k} (gamma from the right)")
            for r, x, y in zip(curve, xs, ys):
                ax.annotate(f"{r['gamma']:g}", (x, y), textcoords="offset points", xytext=(4, -12), fontsize=8)
        ax.set_xscale("log")
        ax.set_ylim(-3, 103)
        ax.set_xlabel("forward passes over the test set (NFE, log scale)")
        ax.set_ylabel("exact match (%)")
        ax.set_title(f"{t}: accuracy vs NFE")
        ax.grid(True, alpha=0.3)
    axes[0].legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot: {path}")


def main():
    args = parse_args()
    work, out = Path(args.work), Path(args.out)
    if not args.train_only and not have_matplotlib():  # said first, not after an hour of training
        print("matplotlib is not installed: the table will be written without its plot "
              "(pip install 'mlx-sbd[bench]' for it)")
    base, data, tests = prepare(work, args)
    init = None
    if args.pretrain_iters:
        init = work / "pretrained"  # resumes like the fine-tunes; a finished one returns at once
        fine_tune(base, work / "pretrain_data", init, "ntp", args, args.pretrain_iters)
    names = [args.train_only] if args.train_only else ["ntp", "sbd"]
    models = {name: fine_tune(base, data, work / name, name, args, args.iters, init) for name in names}
    if args.train_only:
        return
    rows = evaluate_rows(models, tests, work, args)
    tasks = list(tests)
    table = markdown(rows, tasks)
    print("\n" + table)
    out.mkdir(parents=True, exist_ok=True)
    (out / "table1.json").write_text(json.dumps({"settings": settings_of(args), "rows": rows, "markdown": table},
                                                indent=2))
    print(f"raw results: {out / 'table1.json'}")
    if have_matplotlib():
        plot(rows, tasks, out / "table1.png")


if __name__ == "__main__":
    from mlx_sbd.backend import preload_openblas_and_reexec

    preload_openblas_and_reexec()
    main()
