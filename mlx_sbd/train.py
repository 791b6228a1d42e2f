"""SBD fine-tuning: TrainConfig, the training loop, LR schedule, validation, checkpoints and resume.

One optimizer step = `grad_accumulation_steps` micro-batches sharing one block size k ~ U{2..block_size_max}.
All randomness is a pure function of (seed, step): batch n of the data stream comes from batches.py's
per-epoch permutation, the noise of micro-batch m of step s from numpy default_rng([seed, s, m]), and MLX's
key (LoRA dropout) is re-seeded each step. A checkpoint therefore needs only the weights, the optimizer state
and the step, and a resumed run repeats the uninterrupted one exactly.

Checkpoints: <adapter_path>/checkpoints/step_XXXXXXX/ (adapter files + optimizer.safetensors + state.json),
written into a temporary folder and renamed, so a killed run never leaves a half-written one. The adapter
itself is rewritten at <adapter_path> at every save, so it is usable at any time. Reports (NTP and MATP loss,
tokens/s counting real sequence tokens once, peak memory) go to the progress bar and <adapter_path>/train_log.jsonl.

Data parallel (the same code under `mlx.launch`, any number of processes, mx.distributed's ring/MPI back-end):
every rank draws the same global batch and its noise (as above), builds it, and trains rows
[rank*b, (rank+1)*b) of it, b = batch_size / world size; so a sequence's η, masks and k never depend on the rank.
Each rank's loss is its share of the global per-token means (its NTP/MATP sums over the label counts of the whole
batch), so the shares' gradients, summed with all_sum, are exactly the single-process gradient. Rank 0 alone
writes files and prints; at start every rank takes rank 0's weights, optimizer state and step (its checkpoint
on --resume). LoRA dropout keys are per rank, so only a run without dropout is bit-for-bit the single-process one.
"""

import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Optional

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.nn.utils import average_gradients
from mlx.utils import tree_flatten, tree_map, tree_unflatten
from tqdm import tqdm

from .adapter import load_adapter_weights, make_trainable, save_adapter
from .batches import batch_order, iterate_batches, make_batch
from .data import load_dataset
from .masks import training_mask
from .errors import SBDError
from .loss import LOSSES, loss_for
from .model import SBDSettings

CHECKPOINTS = "checkpoints"
TRAIN_LOG = "train_log.jsonl"  # in the adapter folder: training reports and validation losses, one JSON per line


@dataclass
class TrainConfig:
    model: Optional[str] = None  # None: the built-in SmolLM2-135M-Instruct
    data: str = "data"
    adapter_path: str = "adapters"
    fine_tune_type: str = "lora"  # lora | dora | full
    objective: str = "sbd"  # sbd | ntp (the baseline: NTP loss only, no MATP term, no noised half)
    num_layers: int = 16  # blocks (from the top) that get LoRA layers; -1 = all
    lora_parameters: dict = field(default_factory=lambda: {"rank": 8, "scale": 20.0, "dropout": 0.0})
    batch_size: int = 4
    iters: int = 1000  # optimizer steps
    learning_rate: float = 1e-4
    min_learning_rate: float = 0.0  # end of the cosine decay
    warmup: int = 100
    weight_decay: float = 0.01
    grad_clip: Optional[float] = None  # clip the global gradient norm to this before each update (None: off)
    block_size_max: int = 16
    max_seq_length: int = 2048
    mask_prompt: bool = False
    grad_accumulation_steps: int = 1
    grad_checkpoint: bool = False
    steps_per_report: int = 10
    steps_per_eval: int = 200
    val_batches: int = 25  # -1: the whole validation set
    steps_per_save: int = 100
    seed: int = 0
    resume: bool = False
    init_adapter: Optional[str] = None  # start from this adapter folder's weights (a finished run), new schedule
    compile: bool = True  # mx.compile the step; on the CPU back-end the first step pays a ~10-30 s C++ JIT build
    overwrite: bool = False  # a new run into an adapter folder that holds an earlier run deletes that run's files
    # Gated LoRA (adapter.py; None: gated for LoRA/DoRA SBD runs, which is the default; False: the paper's way, --ungated)
    gated: Optional[bool] = None
    shift_blocks: Optional[bool] = None  # random block grid shift per sequence (batches.make_batch); None: = gated

    def resolve_gating(self) -> None:
        """Fill in gated / shift_blocks from the fine-tune type and objective when they are left unset."""
        if self.gated is None:
            self.gated = self.fine_tune_type in ("lora", "dora") and self.objective == "sbd"
        if self.gated and self.fine_tune_type == "full":
            raise SBDError("a full fine-tune cannot be gated (gating applies LoRA deltas to mask rows); pass --ungated")
        if self.gated and self.objective != "sbd":
            raise SBDError(f"--objective {self.objective} trains the causal path, which a gated adapter leaves alone; "
                           "pass --ungated")
        if self.shift_blocks is None:
            self.shift_blocks = self.gated

    def check(self) -> None:
        """Every setting where it enters, once: a value that would run and produce nothing (a NaN learning rate,
        rank 0, no validation batch...) is an SBDError naming its flag."""
        if self.objective not in LOSSES:
            raise SBDError(f"--objective must be one of {', '.join(LOSSES)} (got '{self.objective}')")
        for name in INTEGER_SETTINGS:  # a YAML value like `iters: 2.5` or `"100"` is not a count
            if not _is_integer(getattr(self, name)):
                raise SBDError(f"{setting_name(name)} must be an integer (got {getattr(self, name)!r})")
        if self.block_size_max < 2:
            raise SBDError(f"--block-size-max must be at least 2 (got {self.block_size_max})")
        if self.grad_clip is not None and not (_is_number(self.grad_clip) and 0 < self.grad_clip < float("inf")):
            raise SBDError(f"--grad-clip must be a finite number > 0 (got {self.grad_clip!r}); leave it out to not clip")
        for name in ("batch_size", "iters", "grad_accumulation_steps", "steps_per_save", "steps_per_eval",
                     "steps_per_report"):
            if getattr(self, name) < 1:
                raise SBDError(f"{setting_name(name)} must be at least 1 (got {getattr(self, name)})")
        for name in ("learning_rate", "min_learning_rate", "weight_decay"):  # NaN would train a NaN adapter
            value = getattr(self, name)
            if not (_is_number(value) and 0 <= value < float("inf")):
                raise SBDError(f"{setting_name(name)} must be a finite number >= 0 (got {value!r})")
        if self.max_seq_length < 2:  # a sequence needs two tokens for one next-token label
            raise SBDError(f"--max-seq-length must be at least 2 (got {self.max_seq_length})")
        if self.val_batches == 0 or self.val_batches < -1:
            raise SBDError(f"--val-batches must be at least 1, or -1 for the whole validation set (got "
                           f"{self.val_batches}); to skip validation, leave valid.jsonl out of the data folder")
        if self.warmup < 0:
            raise SBDError(f"--warmup must be >= 0 (got {self.warmup})")
        if self.resume and self.overwrite:
            raise SBDError("--resume continues the run in --adapter-path and --overwrite deletes it: give only one")
        if not isinstance(self.lora_parameters or {}, dict):
            raise SBDError(f"lora_parameters must be a mapping of rank, scale, dropout (got {self.lora_parameters!r})")
        self.lora_parameters = {"rank": 8, "scale": 20.0, "dropout": 0.0, **(self.lora_parameters or {})}
        check_lora_parameters(self.lora_parameters)


def lr_schedule(cfg: TrainConfig):
    """Linear warmup from 0 to learning_rate, then cosine decay to min_learning_rate at the last step."""
    warmup = min(cfg.warmup, cfg.iters - 1)
    decay = optim.cosine_decay(cfg.learning_rate, max(cfg.iters - warmup, 1), cfg.min_learning_rate)
    if warmup <= 0:
        return decay
    return optim.join_schedules([optim.linear_schedule(0.0, cfg.learning_rate, warmup), decay], [warmup])


def adapter_config(cfg: TrainConfig, model) -> dict:
    n = len(model.layers) if cfg.num_layers < 0 else min(cfg.num_layers, len(model.layers))
    training = {k: v for k, v in asdict(cfg).items() if k not in ("resume", "compile")}
    return {
        "fine_tune_type": cfg.fine_tune_type,
        "gated": bool(cfg.gated),
        "num_layers": n,
        "lora_parameters": cfg.lora_parameters,
        "sbd": {**SBDSettings(block_size_max=cfg.block_size_max, block_size=cfg.block_size_max).to_dict(),
                "training": training},
    }


def train(cfg: TrainConfig, model=None, tokenizer=None):
    """Fine-tune `model` (loaded from cfg.model when not given) with cfg.objective; returns the model."""
    cfg.check()
    cfg.resolve_gating()
    world = mx.distributed.init()
    rank, size = world.rank(), world.size()
    rows = shard_rows(cfg.batch_size, rank, size)
    main = rank == 0  # the only rank that prints and writes files
    if main:  # before anything is loaded: never mix with an earlier run's files, resume only its own checkpoints
        check_adapter_folder(cfg)
    if model is None:
        from .loading import load

        model, tokenizer = load(cfg.model, adapter_path=False)  # train from the plain base
    train_set, valid_set, _ = load_dataset(cfg.data, tokenizer, cfg.max_seq_length, cfg.mask_prompt)
    batch_order(train_set, cfg.batch_size)  # fail now, not at the first step, on a too-small dataset
    if valid_set and len(valid_set) < size:
        raise SBDError(f"valid.jsonl has {len(valid_set)} examples, fewer than the {size} processes; add examples")
    mx.random.seed(cfg.seed)  # LoRA initialisation
    make_trainable(model, cfg.fine_tune_type, cfg.num_layers, cfg.lora_parameters, gated=cfg.gated)
    model.grad_checkpoint = cfg.grad_checkpoint
    optimizer = optim.AdamW(learning_rate=lr_schedule(cfg), weight_decay=cfg.weight_decay)
    optimizer.init(model.trainable_parameters())
    config = adapter_config(cfg, model)
    adapter_path = Path(cfg.adapter_path)
    if cfg.init_adapter and main:  # start from a finished run's weights; a checkpoint of this run (--resume) wins
        load_adapter_weights(model, Path(cfg.init_adapter), f"--init-adapter {cfg.init_adapter}")
        tqdm.write(f"Starting from the weights of {cfg.init_adapter}")
    start = restore_checkpoint(adapter_path, model, optimizer) if cfg.resume and main else 0
    if start:
        prune_log(adapter_path, start)
    if size > 1:  # one starting point for all: rank 0's (its checkpoint's) weights, optimizer state and step
        model.update(broadcast(model.trainable_parameters(), world))
        optimizer.state = broadcast(optimizer.state, world)
        start = int(broadcast({"step": mx.array(start)}, world)["step"].item())

    accum = cfg.grad_accumulation_steps
    loss_and_grad = nn.value_and_grad(model, partial(shard_loss, loss_fn=loss_for(cfg.objective, cfg.gated)))
    state = [model.state, optimizer.state, mx.random.state]

    def step_fn(batch, totals, prev_grad, do_update):
        (loss, ntp, matp), grad = loss_and_grad(model, batch, totals)
        norm = mx.array(0.0)
        if prev_grad is not None:
            grad = tree_map(lambda a, b: a + b, grad, prev_grad)
        if do_update:
            # average_gradients is all_sum / size; the ranks' shares must be summed, hence * size.
            grad = tree_map(lambda g: g * (size / accum), average_gradients(grad, world))
            # The whole step's gradient norm (all ranks and micro-batches) is logged even when not clipping;
            # an infinite bound scales by exactly 1.
            grad, norm = optim.clip_grad_norm(grad, cfg.grad_clip or float("inf"))
            optimizer.update(model, grad)
            grad = None
        return ntp, matp, grad, norm

    if cfg.compile:
        step_fn = mx.compile(step_fn, inputs=state, outputs=state)
    data = iterate_batches(train_set, cfg.batch_size, cfg.seed, start=start * accum)
    model.train()
    stats = np.zeros(6)  # since the last report: ntp sum, matp sum, tokens, seconds, steps, gradient-norm sum
    bar = tqdm(total=cfg.iters, initial=start, desc=f"{cfg.objective.upper()} train", unit="step", disable=not main)
    for step in range(start, cfg.iters):
        if valid_set and (step == start or (step + 1) % cfg.steps_per_eval == 0):
            val_ntp, val_matp = evaluate(model, valid_set, cfg, world)
            if main:
                bar.write(f"step {step}: val NTP {val_ntp:.3f}  val MATP {val_matp:.3f}")
                log(adapter_path, {"step": step, "val_ntp": val_ntp, "val_matp": val_matp})
            model.train()
        tic = time.perf_counter()
        mx.random.seed((cfg.seed * 1_000_003 + step) * size + rank)  # LoRA dropout: a different key per rank
        k = int(np.random.default_rng([cfg.seed, step]).integers(2, cfg.block_size_max + 1))
        grad = None
        for m in range(accum):
            seqs = next(data)
            batch = make_batch(seqs, k, np.random.default_rng([cfg.seed, step, m]), shift_blocks=cfg.shift_blocks)
            ntp, matp, grad, norm = step_fn(shard(batch, seqs, k, rows), label_totals(batch), grad, m == accum - 1)
            mx.eval(state, ntp, matp, grad, norm)
            stats[:3] += (ntp.item() / accum, matp.item() / accum, sum(len(s) for s, _ in seqs))
        stats[3:] += (time.perf_counter() - tic, 1, norm.item())
        check_finite(ntp.item(), matp.item(), norm.item(), step + 1)  # before anything of this step is saved
        bar.update(1)
        done = step + 1
        if done % cfg.steps_per_report == 0 or done == cfg.iters:
            stats[:2] = global_sum(stats[:2], world)  # this rank's shares of the losses -> the global means
            report = {
                "step": done, "ntp": stats[0] / stats[4], "matp": stats[1] / stats[4],
                "tokens_per_s": stats[2] / stats[3], "s_per_step": stats[3] / stats[4], "grad_norm": stats[5] / stats[4],
                "lr": optimizer.learning_rate.item(), "peak_memory_gb": mx.get_peak_memory() / 1e9,
            }
            bar.set_postfix(ntp=f"{report['ntp']:.3f}", matp=f"{report['matp']:.3f}",
                            tok_s=f"{report['tokens_per_s']:.0f}", peak_gb=f"{report['peak_memory_gb']:.2f}")
            if main:
                log(adapter_path, report)
            stats[:] = 0
        if main and (done % cfg.steps_per_save == 0 or done == cfg.iters):
            save_checkpoint(adapter_path, model, optimizer, done, config, cfg)
    bar.close()
    if main and start >= cfg.iters:  # resumed a finished run: just make sure the adapter is there
        save_adapter(model, adapter_path, config)
    return model


def shard_rows(batch_size: int, rank: int, size: int) -> slice:
    """The rows of each global batch that `rank` of `size` processes trains."""
    if batch_size % size:
        raise SBDError(f"--batch-size {batch_size} does not split evenly over {size} processes; "
                       f"use a multiple of {size} (it is the global batch, shared out across processes)")
    b = batch_size // size
    return slice(rank * b, (rank + 1) * b)


def shard(batch, seqs, k: int, rows: slice):
    """Rows `rows` of a global batch built by make_batch (same L, same noise as the whole batch). The mask
    [b, 1, 2L, 2L] is rebuilt for these rows rather than sliced, so the global one is never computed."""
    if rows == slice(0, len(seqs)):
        return batch
    part = {key: value[rows] for key, value in batch.items() if key != "mask"}
    lengths = mx.array([len(s) for s, _ in seqs[rows]], mx.int32)
    part["mask"] = training_mask(batch["ntp_targets"].shape[1], k, lengths, part["block_shifts"])
    return part


def label_totals(batch) -> mx.array:
    """[2]: NTP labels and masked tokens in the whole global batch (at least 1 each): the loss denominators."""
    return mx.maximum(mx.stack([batch["ntp_weights"].sum(), batch["matp_weights"].sum()]), 1)


def shard_loss(model, batch, totals, loss_fn):
    """This rank's share of the global-batch loss -> (loss, ntp share, matp share). loss_fn's per-token means
    times this shard's label counts are its loss sums; over the global counts they add up across ranks to
    exactly the global means the single-process run computes (not an average of per-rank means)."""
    _, ntp, matp, n_ntp = loss_fn(model, batch)
    ntp_share = ntp * n_ntp / totals[0]
    matp_share = matp * batch["matp_weights"].sum() / totals[1]
    return ntp_share + matp_share, ntp_share, matp_share


def broadcast(tree: dict, world) -> dict:
    """Rank 0's values of an array tree on every rank: all_sums to which the other ranks add zeros. Leaves go
    in sorted key order: a restored optimizer state lists its keys in another order than a fresh one."""
    keep = world.rank() == 0
    flat = sorted(tree_flatten(tree), key=lambda kv: kv[0])
    flat = [(key, mx.distributed.all_sum(x if keep else mx.zeros_like(x), group=world)) for key, x in flat]
    mx.eval([x for _, x in flat])
    return tree_unflatten(flat)


def global_sum(values: np.ndarray, world) -> np.ndarray:
    """Sum of a small float vector over the ranks (the identity for a single process)."""
    if world.size() == 1:
        return values
    return np.array(mx.distributed.all_sum(mx.array(values, mx.float32), group=world))


def log(adapter_path: Path, record: dict) -> None:
    """Append one report to <adapter_path>/train_log.jsonl (train and validation losses, speed, memory)."""
    adapter_path.mkdir(parents=True, exist_ok=True)
    with open(adapter_path / TRAIN_LOG, "a") as f:
        f.write(json.dumps(record) + "\n")


def prune_log(adapter_path: Path, step: int) -> None:
    """Drop what a killed run logged after its checkpoint at `step` (training reports past it, validation from
    it on): the resumed run logs those again, so the log reads like the uninterrupted run's."""
    path = adapter_path / TRAIN_LOG
    if not path.is_file():
        return
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    keep = [r for r in records if r["step"] < step or (r["step"] == step and "val_ntp" not in r)]
    path.write_text("".join(json.dumps(r) + "\n" for r in keep))


def evaluate(model, dataset, cfg: TrainConfig, world):
    """Mean validation (NTP, MATP) over up to val_batches batches, with fixed noise so runs compare; each batch
    is shared out across the ranks like a training batch (its size rounded down to a multiple of their number)."""
    model.eval()
    size = world.size()
    batch_size = min(cfg.batch_size, len(dataset)) // size * size
    rows = shard_rows(batch_size, world.rank(), size)
    batches = batch_order(dataset, batch_size)
    if cfg.val_batches >= 0:
        batches = batches[: cfg.val_batches]
    shares = np.zeros(2)  # this rank's (NTP, MATP) shares, summed over batches
    for b, idx in enumerate(batches):
        rng = np.random.default_rng([cfg.seed, 1 << 30, b])
        k = int(rng.integers(2, cfg.block_size_max + 1))
        seqs = [dataset[i] for i in idx]
        batch = make_batch(seqs, k, rng, shift_blocks=cfg.shift_blocks)
        _, n, m = shard_loss(model, shard(batch, seqs, k, rows), label_totals(batch), loss_for(cfg.objective, cfg.gated))
        mx.eval(n, m)
        shares += (n.item(), m.item())
    ntp, matp = global_sum(shares, world) / len(batches)
    return float(ntp), float(matp)


def save_checkpoint(adapter_path: Path, model, optimizer, step: int, config: dict, cfg: TrainConfig) -> Path:
    """Write checkpoints/step_XXXXXXX atomically (temp folder + rename), then refresh the adapter itself."""
    root = adapter_path / CHECKPOINTS
    final = root / f"step_{step:07d}"
    tmp = root / f".tmp-step_{step:07d}"
    shutil.rmtree(tmp, ignore_errors=True)
    save_adapter(model, tmp, config)
    mx.save_safetensors(str(tmp / "optimizer.safetensors"), dict(tree_flatten(optimizer.state)))
    state = {
        "step": step,
        "batches_consumed": step * cfg.grad_accumulation_steps,
        "seed": cfg.seed,
        "rng": "derived from (seed, step): numpy default_rng([seed, step, micro]); mx.random.seed(seed*1000003+step)",
    }
    (tmp / "state.json").write_text(json.dumps(state, indent=2))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    save_adapter(model, adapter_path, config)
    return final


def latest_checkpoint(adapter_path: Path) -> Optional[Path]:
    done = sorted(p for p in (adapter_path / CHECKPOINTS).glob("step_*") if (p / "state.json").is_file())
    return done[-1] if done else None


def restore_checkpoint(adapter_path: Path, model, optimizer) -> int:
    """Load the latest complete checkpoint into model and optimizer; returns its step (0 if none). That checkpoint
    was checked against this run's settings (check_adapter_folder) before anything was loaded."""
    ckpt = latest_checkpoint(adapter_path)
    if ckpt is None:
        tqdm.write(f"--resume: no checkpoint in {adapter_path / CHECKPOINTS}, starting from step 0")
        prune_log(adapter_path, 0)  # what a run killed before its first checkpoint logged is done again
        return 0
    load_adapter_weights(model, ckpt, f"checkpoint {ckpt}")
    optimizer.state = tree_unflatten(list(mx.load(str(ckpt / "optimizer.safetensors")).items()))
    step = json.loads((ckpt / "state.json").read_text())["step"]
    tqdm.write(f"Resuming from {ckpt} (step {step})")
    return step


# ---------------------------------------------------------------- settings checks and the adapter folder's owner
INTEGER_SETTINGS = ("num_layers", "batch_size", "iters", "warmup", "block_size_max", "max_seq_length",
                    "grad_accumulation_steps", "steps_per_report", "steps_per_eval", "val_batches", "steps_per_save",
                    "seed")
FLAG_NAMES = {"steps_per_save": "--save-every", "gated": "gated (--ungated)"}  # flag is not --<name with dashes>
NO_FLAG = ("objective", "min_learning_rate", "weight_decay", "shift_blocks")  # config-file (-c) keys only
# What a checkpoint's run and the run that resumes it may set differently (every other setting the checkpoint
# records must be equal, or --resume refuses): where the files are (model/data are compared as
# paths), how often it reports, evaluates and saves and how much it validates (none of that changes the weights),
# how it runs (compile, grad_checkpoint: the same numbers), init_adapter (the checkpoint's weights win over it), and
# iters: a resumed run may train longer (or stop sooner, though not before the checkpoint's step); the learning
# rate then follows the schedule of the new iters from the checkpoint's step on.
RESUME_MAY_CHANGE = ("adapter_path", "init_adapter", "iters", "steps_per_report", "steps_per_eval", "steps_per_save",
                     "val_batches", "compile", "grad_checkpoint", "resume", "overwrite")
PATH_SETTINGS = ("model", "data")
RUN_FILES = ("adapters.safetensors", "sbd.safetensors", "adapter_config.json", TRAIN_LOG)  # and CHECKPOINTS/


def setting_name(name: str) -> str:
    """How the user set `name`: its flag, or its key in the -c config file when it has no flag."""
    if name in NO_FLAG:
        return f"{name} (in the -c config file)"
    return FLAG_NAMES.get(name, "--" + name.replace("_", "-"))


def _is_number(value) -> bool:  # numpy scalars count, bools do not
    import numbers

    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _is_integer(value) -> bool:
    import numbers

    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_lora_parameters(params: dict) -> None:
    rank, scale, dropout = params.get("rank"), params.get("scale"), params.get("dropout")
    if not _is_integer(rank) or rank < 1:
        raise SBDError(f"--lora-rank must be an integer >= 1 (got {rank!r})")
    if not (_is_number(scale) and abs(scale) < float("inf")):
        raise SBDError(f"--lora-scale must be a finite number (got {scale!r})")
    if not (_is_number(dropout) and 0 <= dropout < 1):
        raise SBDError(f"--lora-dropout must be in [0, 1) (got {dropout!r})")


def previous_run_files(adapter_path: Path) -> list:
    """The names in `adapter_path` that a training run wrote (adapter files, log, checkpoints)."""
    found = [name for name in RUN_FILES if (adapter_path / name).exists()]
    checkpoints = adapter_path / CHECKPOINTS
    if checkpoints.is_dir() and any(checkpoints.iterdir()):
        found.append(CHECKPOINTS + "/")
    return found


def check_adapter_folder(cfg: TrainConfig) -> None:
    """A new run refuses a folder that holds an earlier run (unless cfg.overwrite, which deletes that run's files);
    --resume refuses a checkpoint made with other settings (RESUME_MAY_CHANGE lists what may differ)."""
    path = Path(cfg.adapter_path)
    if path.exists() and not path.is_dir():
        raise SBDError(f"--adapter-path {path} is a file; give a folder")
    if cfg.init_adapter and os.path.abspath(cfg.init_adapter) == os.path.abspath(path):
        raise SBDError(f"--init-adapter {cfg.init_adapter} is the --adapter-path this run writes to; "
                       "give the new run another --adapter-path")
    if cfg.resume:
        check_resume(cfg, path)
        return
    found = previous_run_files(path)
    if not found:
        return
    if not cfg.overwrite:
        raise SBDError(f"{path} already holds a training run ({', '.join(found)}): continue it with --resume, "
                       "replace it with --overwrite (deletes it), or choose another --adapter-path")
    tqdm.write(f"--overwrite: deleting the earlier run in {path} ({', '.join(found)})")
    shutil.rmtree(path / CHECKPOINTS, ignore_errors=True)
    for name in RUN_FILES:
        (path / name).unlink(missing_ok=True)


def check_resume(cfg: TrainConfig, path: Path) -> None:
    from .adapter import ADAPTER_CONFIG

    ckpt = latest_checkpoint(path)
    if ckpt is None:
        adapter = [name for name in RUN_FILES[:3] if (path / name).exists()]
        if adapter:  # an adapter without checkpoints is not a run this one can continue
            raise SBDError(f"--resume: {path} holds an adapter ({', '.join(adapter)}) but no checkpoint to continue "
                           "from; start a new run with --overwrite (deletes it) or choose another --adapter-path")
        return  # nothing saved yet (killed before the first checkpoint): restore_checkpoint starts at step 0
    try:
        saved = json.loads((ckpt / ADAPTER_CONFIG).read_text())["sbd"]["training"]
        step = json.loads((ckpt / "state.json").read_text())["step"]
    except (OSError, ValueError, KeyError, TypeError):
        saved = None
    if not isinstance(saved, dict):
        raise SBDError(f"--resume: checkpoint {ckpt} does not record its training settings, so it cannot be checked "
                       "against this run; start a new run with --overwrite or choose another --adapter-path")
    ours = json.loads(json.dumps(asdict(cfg), default=lambda v: v.item() if hasattr(v, "item") else str(v)))
    differ = []
    for name in sorted(set(ours) & set(saved)):  # a checkpoint of an older version: the settings it records
        if name in RESUME_MAY_CHANGE:
            continue
        a, b = ours[name], saved[name]
        if name in PATH_SETTINGS and isinstance(a, str) and isinstance(b, str):
            a, b = os.path.abspath(a), os.path.abspath(b)
        if a != b:
            differ.append(f"{setting_name(name)} {json.dumps(a)} here, {json.dumps(b)} there")
    if differ:
        more = f" (and {len(differ) - 3} more)" if len(differ) > 3 else ""
        raise SBDError(f"--resume: checkpoint {ckpt} belongs to a run with other settings: {'; '.join(differ[:3])}"
                       f"{more}; resume with that run's settings, or start a new run with --overwrite (deletes it) "
                       "or another --adapter-path")
    if cfg.iters < step:
        raise SBDError(f"--resume: checkpoint {ckpt} is at step {step}, past --iters {cfg.iters}; "
                       f"give --iters {step} or more")


def check_finite(ntp: float, matp: float, norm: float, step: int) -> None:
    """A non-finite loss or gradient ruins the weights for good: stop before they are written anywhere."""
    if not all(math.isfinite(v) for v in (ntp, matp, norm)):
        raise SBDError(f"step {step}: the loss or gradient is not finite (NTP {ntp}, MATP {matp}, gradient norm {norm}); "
                       "nothing of this step was saved. Lower --learning-rate or set --grad-clip, then --resume from "
                       "the last checkpoint")
