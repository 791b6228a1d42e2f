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
"""

import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_map, tree_unflatten
from tqdm import tqdm

from .adapter import make_trainable, save_adapter
from .batches import batch_order, iterate_batches, make_batch
from .data import load_dataset
from .errors import SBDError
from .loss import sbd_loss
from .model import SBDSettings

CHECKPOINTS = "checkpoints"


@dataclass
class TrainConfig:
    model: Optional[str] = None  # None: the built-in SmolLM2-135M-Instruct
    data: str = "data"
    adapter_path: str = "adapters"
    fine_tune_type: str = "lora"  # lora | dora | full
    num_layers: int = 16  # blocks (from the top) that get LoRA layers; -1 = all
    lora_parameters: dict = field(default_factory=lambda: {"rank": 8, "scale": 20.0, "dropout": 0.0})
    batch_size: int = 4
    iters: int = 1000  # optimizer steps
    learning_rate: float = 1e-4
    min_learning_rate: float = 0.0  # end of the cosine decay
    warmup: int = 100
    weight_decay: float = 0.01
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
    compile: bool = True  # mx.compile the step; on the CPU back-end the first step pays a ~10-30 s C++ JIT build

    def check(self) -> None:
        if self.block_size_max < 2:
            raise SBDError(f"--block-size-max must be at least 2 (got {self.block_size_max})")
        for name in ("batch_size", "iters", "grad_accumulation_steps", "steps_per_save", "steps_per_eval"):
            if getattr(self, name) < 1:
                raise SBDError(f"--{name.replace('_', '-')} must be at least 1 (got {getattr(self, name)})")
        self.lora_parameters = {"rank": 8, "scale": 20.0, "dropout": 0.0, **(self.lora_parameters or {})}


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
        "num_layers": n,
        "lora_parameters": cfg.lora_parameters,
        "sbd": {**SBDSettings(block_size_max=cfg.block_size_max, block_size=cfg.block_size_max).to_dict(),
                "training": training},
    }


def train(cfg: TrainConfig, model=None, tokenizer=None):
    """Fine-tune `model` (loaded from cfg.model when not given) with the SBD objective; returns the model."""
    cfg.check()
    if model is None:
        from .loading import load

        model, tokenizer = load(cfg.model)
    train_set, valid_set, _ = load_dataset(cfg.data, tokenizer, cfg.max_seq_length, cfg.mask_prompt)
    batch_order(train_set, cfg.batch_size)  # fail now, not at the first step, on a too-small dataset
    mx.random.seed(cfg.seed)  # LoRA initialisation
    make_trainable(model, cfg.fine_tune_type, cfg.num_layers, cfg.lora_parameters)
    model.grad_checkpoint = cfg.grad_checkpoint
    optimizer = optim.AdamW(learning_rate=lr_schedule(cfg), weight_decay=cfg.weight_decay)
    optimizer.init(model.trainable_parameters())
    config = adapter_config(cfg, model)
    adapter_path = Path(cfg.adapter_path)
    start = restore_checkpoint(adapter_path, model, optimizer) if cfg.resume else 0

    accum = cfg.grad_accumulation_steps
    loss_and_grad = nn.value_and_grad(model, sbd_loss)
    state = [model.state, optimizer.state, mx.random.state]

    def step_fn(batch, prev_grad, do_update):
        (loss, ntp, matp, ntok), grad = loss_and_grad(model, batch)
        if prev_grad is not None:
            grad = tree_map(lambda a, b: a + b, grad, prev_grad)
        if do_update:
            optimizer.update(model, tree_map(lambda g: g / accum, grad))
            grad = None
        return ntp, matp, grad

    if cfg.compile:
        step_fn = mx.compile(step_fn, inputs=state, outputs=state)
    data = iterate_batches(train_set, cfg.batch_size, cfg.seed, start=start * accum)
    model.train()
    stats = np.zeros(5)  # since the last report: ntp sum, matp sum, tokens, seconds, steps
    bar = tqdm(total=cfg.iters, initial=start, desc="SBD train", unit="step")
    for step in range(start, cfg.iters):
        if valid_set and (step == start or (step + 1) % cfg.steps_per_eval == 0):
            val_ntp, val_matp = evaluate(model, valid_set, cfg)
            bar.write(f"step {step}: val NTP {val_ntp:.3f}  val MATP {val_matp:.3f}")
            log(adapter_path, {"step": step, "val_ntp": val_ntp, "val_matp": val_matp})
            model.train()
        tic = time.perf_counter()
        mx.random.seed(cfg.seed * 1_000_003 + step)
        k = int(np.random.default_rng([cfg.seed, step]).integers(2, cfg.block_size_max + 1))
        grad = None
        for m in range(accum):
            seqs = next(data)
            batch = make_batch(seqs, k, np.random.default_rng([cfg.seed, step, m]))
            ntp, matp, grad = step_fn(batch, grad, m == accum - 1)
            mx.eval(state, ntp, matp, grad)
            stats[:3] += (ntp.item() / accum, matp.item() / accum, sum(len(s) for s, _ in seqs))
        stats[3:] += (time.perf_counter() - tic, 1)
        bar.update(1)
        done = step + 1
        if done % cfg.steps_per_report == 0 or done == cfg.iters:
            report = {
                "step": done, "ntp": stats[0] / stats[4], "matp": stats[1] / stats[4],
                "tokens_per_s": stats[2] / stats[3], "s_per_step": stats[3] / stats[4],
                "lr": optimizer.learning_rate.item(), "peak_memory_gb": mx.get_peak_memory() / 1e9,
            }
            bar.set_postfix(ntp=f"{report['ntp']:.3f}", matp=f"{report['matp']:.3f}",
                            tok_s=f"{report['tokens_per_s']:.0f}", peak_gb=f"{report['peak_memory_gb']:.2f}")
            log(adapter_path, report)
            stats[:] = 0
        if done % cfg.steps_per_save == 0 or done == cfg.iters:
            save_checkpoint(adapter_path, model, optimizer, done, config, cfg)
    bar.close()
    if start >= cfg.iters:  # resumed a finished run: just make sure the adapter is there
        save_adapter(model, adapter_path, config)
    return model


def log(adapter_path: Path, record: dict) -> None:
    """Append one report to <adapter_path>/train_log.jsonl (train and validation losses, speed, memory)."""
    adapter_path.mkdir(parents=True, exist_ok=True)
    with open(adapter_path / "train_log.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")


def evaluate(model, dataset, cfg: TrainConfig):
    """Mean validation (NTP, MATP) over up to val_batches batches, with fixed noise so runs compare."""
    model.eval()
    batches = batch_order(dataset, min(cfg.batch_size, len(dataset)))
    if cfg.val_batches >= 0:
        batches = batches[: cfg.val_batches]
    ntp = matp = 0.0
    for b, idx in enumerate(batches):
        rng = np.random.default_rng([cfg.seed, 1 << 30, b])
        k = int(rng.integers(2, cfg.block_size_max + 1))
        _, n, m, _ = sbd_loss(model, make_batch([dataset[i] for i in idx], k, rng))
        mx.eval(n, m)
        ntp, matp = ntp + n.item(), matp + m.item()
    return ntp / len(batches), matp / len(batches)


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
    """Load the latest complete checkpoint into model and optimizer; returns its step (0 if none)."""
    ckpt = latest_checkpoint(adapter_path)
    if ckpt is None:
        tqdm.write(f"--resume: no checkpoint in {adapter_path / CHECKPOINTS}, starting from step 0")
        return 0
    weights = mx.load(str(ckpt / "adapters.safetensors"))
    model.lm.load_weights(list(weights.items()), strict=False)
    model.mask_embedding = mx.load(str(ckpt / "sbd.safetensors"))["mask_embedding"]
    optimizer.state = tree_unflatten(list(mx.load(str(ckpt / "optimizer.safetensors")).items()))
    step = json.loads((ckpt / "state.json").read_text())["step"]
    tqdm.write(f"Resuming from {ckpt} (step {step})")
    return step

