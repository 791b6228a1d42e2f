"""The adapter folder a training run owns: checkpoints, the training log, and the checks that keep runs apart.

Checkpoints: <adapter_path>/checkpoints/step_XXXXXXX/ (adapter files + optimizer.safetensors + state.json),
written into a temporary folder and renamed, so a killed run never leaves a half-written one. The adapter
itself is rewritten at <adapter_path> at every save, so it is usable at any time. All randomness of a run is a
pure function of (seed, step) (train.py), so a checkpoint needs only the weights, the optimizer state and the step.
A new run refuses a folder that holds another run; --resume refuses a checkpoint made with other settings.
"""

import json
import os
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten
from tqdm import tqdm

from .adapter import ADAPTER_CONFIG, load_adapter_weights, save_adapter
from .corpus import CORPUS_FILE
from .errors import SBDError
from .train_config import TrainConfig, setting_name

CHECKPOINTS = "checkpoints"
TRAIN_LOG = "train_log.jsonl"  # in the adapter folder: training reports and validation losses, one JSON per line

# What a checkpoint's run and the run that resumes it may set differently (every other setting the checkpoint
# records must be equal, or --resume refuses): where the files are (model/data are compared as
# paths), how often it reports, evaluates and saves and how much it validates (none of that changes the weights),
# how it runs (compile, grad_checkpoint: the same numbers), init_adapter (the checkpoint's weights win over it), and
# iters: a resumed run may train longer (or stop sooner, though not before the checkpoint's step); the learning
# rate then follows the schedule of the new iters from the checkpoint's step on.
RESUME_MAY_CHANGE = ("adapter_path", "init_adapter", "iters", "steps_per_report", "steps_per_eval", "steps_per_save",
                     "val_batches", "compile", "grad_checkpoint", "resume", "overwrite", "time_limit")

PATH_SETTINGS = ("model", "data")

# what a run writes into its adapter folder (and CHECKPOINTS/)
RUN_FILES = ("adapters.safetensors", "sbd.safetensors", "adapter_config.json", TRAIN_LOG, CORPUS_FILE)


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
