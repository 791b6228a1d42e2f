"""SBD fine-tuning: the training loop, its LR schedule, reports and validation.

Settings are train_config.TrainConfig; the adapter folder (checkpoints, log, resume checks) is checkpoints.py's; the
data-parallel shares of a batch are sharding.py's; the objectives are loss.py's.

One optimizer step = `grad_accumulation_steps` micro-batches sharing one block size k ~ U{2..block_size_max}.
All randomness is a pure function of (seed, step): batch n of the data stream comes from batches.py's
per-epoch permutation, the noise of micro-batch m of step s from numpy default_rng([seed, s, m]), and MLX's
key (LoRA dropout) is re-seeded each step. A checkpoint therefore needs only the weights, the optimizer state
and the step, and a resumed run repeats the uninterrupted one exactly. Reports (NTP and MATP loss, for gated runs
the teacher-forced draft accuracy, tokens/s counting real sequence tokens once, peak memory) go to the progress bar
and <adapter_path>/train_log.jsonl.

Data parallel (the same code under `mlx.launch`, sharding.py): every rank trains its rows of the same global batch
and the gradients are summed. Rank 0 alone writes files and prints; at start every rank takes rank 0's weights,
optimizer state and step (its checkpoint on --resume). LoRA dropout keys are per rank, so only a run without
dropout is bit-for-bit the single-process one.
"""

import math
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.nn.utils import average_gradients
from mlx.utils import tree_map
from tqdm import tqdm

from .adapter import load_adapter_weights, make_trainable, save_adapter, save_corpus
from .batches import batch_numbers, batch_order, make_batch
from .checkpoints import TRAIN_LOG, check_adapter_folder, log, prune_log, restore_checkpoint, save_checkpoint
from .clean_cache import CleanCache
from .corpus import CORPUS_FILE
from .data import load_dataset
from .errors import SBDError
from .loss import loss_for
from .sharding import broadcast, global_sum, label_totals, shard, shard_loss, shard_rows
from .train_config import SELF_DATA, TrainConfig, adapter_config

__all__ = ["TrainConfig", "train", "lr_schedule", "TRAIN_LOG"]
BUILTIN_DATA = "data"  # <adapter_path>/data: the built-in training set of a run without --data
BUILTIN_ROWS = {"train": 2048, "valid": 32}


@dataclass
class Reports:
    """What the steps since the last report added up to (losses and hits are this rank's shares)."""
    ntp: float = 0.0
    matp: float = 0.0
    hits: float = 0.0  # draft positions whose argmax is the base's next token (gated runs)
    drafts: float = 0.0  # draft positions of the global batches (batches.make_batch)
    tokens: int = 0
    seconds: float = 0.0
    cpu_seconds: float = 0.0  # this process's CPU time (all its threads): a step's work even on a busy machine
    steps: int = 0
    grad_norm: float = 0.0

    def report(self, step: int, world, lr: float, gated: bool) -> dict:
        ntp, matp, hits = global_sum(np.array([self.ntp, self.matp, self.hits]), world)
        out = {"step": step, "ntp": float(ntp) / self.steps, "matp": float(matp) / self.steps}
        if gated:  # teacher-forced: the share of drafts the verifier would accept after a correct prefix
            out["draft_acc"] = float(hits) / max(self.drafts, 1)
        return {**out, "tokens_per_s": self.tokens / self.seconds, "s_per_step": self.seconds / self.steps,
                "cpu_s_per_step": self.cpu_seconds / self.steps, "grad_norm": self.grad_norm / self.steps, "lr": lr,
                "peak_memory_gb": mx.get_peak_memory() / 1e9}


def lr_schedule(cfg: TrainConfig):
    """Linear warmup from 0 to learning_rate, then cosine decay to min_learning_rate at the last step."""
    warmup = min(cfg.warmup, cfg.iters - 1)
    decay = optim.cosine_decay(cfg.learning_rate, max(cfg.iters - warmup, 1), cfg.min_learning_rate)
    if warmup <= 0:
        return decay
    return optim.join_schedules([optim.linear_schedule(0.0, cfg.learning_rate, warmup), decay], [warmup])


def clocked_lr(cfg: TrainConfig, step: int, used: float) -> float:
    """lr_schedule's rate at `step` for a run with a time limit: after warmup the cosine follows whichever has gone
    further, the steps or `used` (the share of the time limit spent), so a stage stopped by the clock still ends
    at min_learning_rate."""
    warmup = min(cfg.warmup, cfg.iters - 1)
    if step < warmup:
        return cfg.learning_rate * step / warmup
    done = min(max((step - warmup) / max(cfg.iters - warmup, 1), used), 1.0)
    return cfg.min_learning_rate + 0.5 * (1 + math.cos(math.pi * done)) * (cfg.learning_rate - cfg.min_learning_rate)


def spent(clock: float, limit: float, world) -> float:
    """The share of the time limit used since `clock`, by rank 0's clock: every rank sets the same learning rate
    and stops at the same step."""
    used = (time.monotonic() - clock) / limit
    if world.size() > 1:
        used = broadcast({"used": mx.array(used)}, world)["used"].item()
    return used


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
    adapter_path = Path(cfg.adapter_path)
    if cfg.data is None:
        data = builtin_data(adapter_path, main)
    elif cfg.data == SELF_DATA:
        data = self_data(adapter_path, model, tokenizer, world)
        if main:  # the base's own answers are a draft source too (corpus.py): they travel in the adapter folder
            write_corpus(adapter_path, data / "train.jsonl", tokenizer)
    else:
        data = cfg.data
    train_set, valid_set, _ = load_dataset(data, tokenizer, cfg.max_seq_length, cfg.mask_prompt)
    batches = batch_order(train_set, cfg.batch_size)  # fails now, not at the first step, on a too-small dataset
    if valid_set and len(valid_set) < size:
        raise SBDError(f"valid.jsonl has {len(valid_set)} examples, fewer than the {size} processes; add examples")
    mx.random.seed(cfg.seed)  # LoRA initialisation
    make_trainable(model, cfg.fine_tune_type, cfg.num_layers, cfg.lora_parameters, gated=cfg.gated)
    model.grad_checkpoint = cfg.grad_checkpoint
    # With a time limit the rate is set before each step (clocked_lr), which a step-indexed schedule cannot do.
    schedule = lr_schedule(cfg) if cfg.time_limit is None else 0.0
    optimizer = optim.AdamW(learning_rate=schedule, weight_decay=cfg.weight_decay)
    optimizer.init(model.trainable_parameters())
    config = adapter_config(cfg, model)
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
    loss_fn = loss_for(cfg.objective, cfg.gated, cfg.targets, cfg.block_size_max)
    loss_and_grad = nn.value_and_grad(model, partial(shard_loss, loss_fn=loss_fn))
    state = [model.state, optimizer.state, mx.random.state]

    def step_fn(batch, totals, prev_grad, do_update):
        (loss, ntp, matp, hits), grad = loss_and_grad(model, batch, totals)
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
        return ntp, matp, hits, grad, norm

    if cfg.compile:
        step_fn = mx.compile(step_fn, inputs=state, outputs=state)
    numbers = batch_numbers(len(batches), cfg.seed, start=start * accum)
    kept = None
    if cfg.cache_clean:
        kept = CleanCache(model, train_set, batches, rows.stop - rows.start, soft=cfg.targets == "soft")
        if main:
            tqdm.write(f"--cache-clean: each batch's clean half is kept after its first epoch "
                       f"(~{kept.size / 2**30:.2f} GB once all {len(batches)} batches were seen)")
    model.train()
    since = Reports()
    bar = tqdm(total=cfg.iters, initial=start, desc=f"{cfg.objective.upper()} train", unit="step", disable=not main)
    clock = time.monotonic()  # the time limit counts training from here (this process's run)
    limit = cfg.time_limit * 60 if cfg.time_limit else None
    used = spent(clock, limit, world) if limit else 0.0  # the share of the time limit spent, read after each step
    for step in range(start, cfg.iters):
        if limit:
            optimizer.learning_rate = clocked_lr(cfg, step, used)
        if valid_set and (step == start or (step + 1) % cfg.steps_per_eval == 0):
            val = evaluate(model, valid_set, cfg, world, loss_fn)
            if main:
                bar.write(f"step {step}: " + "  ".join(f"{name} {value:.3f}" for name, value in val.items()))
                log(adapter_path, {"step": step, **val})
            model.train()
        tic, cpu_tic = time.perf_counter(), time.process_time()
        mx.random.seed((cfg.seed * 1_000_003 + step) * size + rank)  # LoRA dropout: a different key per rank
        k = int(np.random.default_rng([cfg.seed, step]).integers(2, cfg.block_size_max + 1))
        grad = None
        for m in range(accum):
            number = next(numbers)
            seqs = [train_set[j] for j in batches[number]]
            batch = noised_batch(seqs, k, np.random.default_rng([cfg.seed, step, m]), cfg)
            totals = label_totals(batch)
            mine = shard(batch, seqs, k, rows)
            if kept is not None:  # the clean half of this batch, as its first epoch computed it
                mine = kept.fill(number, model, mine)
            ntp, matp, hits, grad, norm = step_fn(mine, totals, grad, m == accum - 1)
            mx.eval(state, ntp, matp, hits, grad, norm)
            since.ntp += ntp.item() / accum
            since.matp += matp.item() / accum
            since.hits += hits.item()
            since.drafts += totals[2].item()
            since.tokens += sum(len(s) for s, _ in seqs)
        since.seconds += time.perf_counter() - tic
        since.cpu_seconds += time.process_time() - cpu_tic
        since.steps += 1
        since.grad_norm += norm.item()
        check_finite(ntp.item(), matp.item(), norm.item(), step + 1)  # before anything of this step is saved
        bar.update(1)
        done = step + 1
        if limit:
            used = spent(clock, limit, world)
        stop = used >= 1 and done < cfg.iters  # every rank reads rank 0's clock: all stop after the same step
        if done % cfg.steps_per_report == 0 or done == cfg.iters or stop:
            report = since.report(done, world, optimizer.learning_rate.item(), cfg.gated)
            shown = {"ntp": "ntp", "matp": "matp", "draft_acc": "acc", "tokens_per_s": "tok_s", "peak_memory_gb": "peak_gb"}
            bar.set_postfix({short: f"{report[key]:.3g}" for key, short in shown.items() if key in report})
            if main:
                log(adapter_path, report)
            since = Reports()
        if main and (done % cfg.steps_per_save == 0 or done == cfg.iters or stop):
            save_checkpoint(adapter_path, model, optimizer, done, config, cfg)
        if stop:
            if main:
                bar.write(f"--time-limit {cfg.time_limit:g} min reached after step {done} of {cfg.iters}: "
                          "checkpoint and adapter saved; --resume continues")
                log(adapter_path, {"step": done, "stopped": "time_limit"})
            break
    bar.close()
    if main and start >= cfg.iters:  # resumed a finished run: just make sure the adapter is there
        save_adapter(model, adapter_path, config)
    return model


def builtin_data(adapter_path: Path, main: bool) -> Path:
    """The training folder of a run without --data: plain text of the Python standard library (its train and valid
    modules; stdlib_text), written once into <adapter_path>/data and reused on --resume. With soft targets (the
    gated default) text needs no answers: the base model's own next-token distributions are the labels."""
    from . import stdlib_text

    folder = adapter_path / BUILTIN_DATA
    if main and not (folder / "train.jsonl").is_file():
        tqdm.write(f"No --data: writing a training set from the Python standard library's source and docs to {folder}")
    counts = stdlib_text.write_text_set(folder, BUILTIN_ROWS["train"], BUILTIN_ROWS["valid"])
    if main:
        tqdm.write(f"Built-in data: {counts['train']} training rows, {counts['valid']} validation rows ({folder})")
    return folder


def self_data(adapter_path: Path, model, tokenizer, world) -> Path:
    """The training folder of `--data self`: the base model's own greedy answers to built-in prompts (distill.py),
    written once into <adapter_path>/data_self (answers kept as they are made; a rerun or --resume continues them).
    Made before the adapter's layers exist, so the answers are the base's. Under mlx.launch rank 0 answers and the
    others wait, then read the folder: it must be shared, or copied to every machine first."""
    from .distill import write_self_set

    folder = adapter_path / "data_self"
    if world.rank() == 0:
        tqdm.write(f"--data self: the base model answers built-in prompts (greedy, batched) into {folder}")
        counts = write_self_set(folder, model, tokenizer)
        tqdm.write(f"Self-distilled data: {counts['train']} training rows, {counts['valid']} validation rows ({folder})")
    if world.size() > 1:
        global_sum(np.zeros(1), world)  # every rank waits for rank 0's answers
        if not (folder / "train.jsonl").is_file():
            raise SBDError(f"--data self: rank {world.rank()} cannot see {folder}, which rank 0 wrote; give every "
                           "machine the same folder (a shared path, or copy it there and pass it with --data)")
    return folder


def write_corpus(adapter_path: Path, data: Path, tokenizer) -> None:
    """The draft corpus of a self-distilled run: the base's answers in `data`, into the adapter folder."""
    from .corpus import Corpus

    corpus = Corpus.from_jsonl(data, tokenizer)
    save_corpus(adapter_path, corpus)
    tqdm.write(f"Draft corpus: {len(corpus)} tokens of the base's own answers ({adapter_path / CORPUS_FILE})")


def noised_batch(seqs, k: int, rng, cfg: TrainConfig):
    """The doubled batch of `seqs` with cfg's noise: the paper's η ~ U(0, 1), or every eligible token masked."""
    eta = np.ones(len(seqs)) if cfg.noise == "full" else None
    batch = make_batch(seqs, k, rng, eta=eta, shift_blocks=cfg.shift_blocks)
    if cfg.drafts_only:  # MATP on draft positions only (the first masked token of a block is never a draft)
        batch["matp_weights"] = batch["draft_weights"]
    return batch


def evaluate(model, dataset, cfg: TrainConfig, world, loss_fn) -> dict:
    """Mean validation losses over up to val_batches batches, with fixed noise so runs compare, -> {val_ntp,
    val_matp} and, for gated runs, val_draft_acc (see Reports). Each batch is shared out across the ranks like a
    training batch (its size rounded down to a multiple of their number)."""
    model.eval()
    size = world.size()
    batch_size = min(cfg.batch_size, len(dataset)) // size * size
    rows = shard_rows(batch_size, world.rank(), size)
    batches = batch_order(dataset, batch_size)
    if cfg.val_batches >= 0:
        batches = batches[: cfg.val_batches]
    sums = np.zeros(3)  # this rank's (NTP, MATP, hits) shares, summed over batches
    drafts = 0.0
    for b, idx in enumerate(batches):
        rng = np.random.default_rng([cfg.seed, 1 << 30, b])
        k = int(rng.integers(2, cfg.block_size_max + 1))
        seqs = [dataset[i] for i in idx]
        batch = noised_batch(seqs, k, rng, cfg)
        totals = label_totals(batch)
        _, n, m, hits = shard_loss(model, shard(batch, seqs, k, rows), totals, loss_fn)
        mx.eval(n, m, hits)
        sums += (n.item(), m.item(), hits.item())
        drafts += totals[2].item()
    ntp, matp, hits = global_sum(sums, world)
    out = {"val_ntp": float(ntp / len(batches)), "val_matp": float(matp / len(batches))}
    if cfg.gated:
        out["val_draft_acc"] = float(hits / max(drafts, 1))
    return out


def check_finite(ntp: float, matp: float, norm: float, step: int) -> None:
    """A non-finite loss or gradient ruins the weights for good: stop before they are written anywhere."""
    if not all(math.isfinite(v) for v in (ntp, matp, norm)):
        raise SBDError(f"step {step}: the loss or gradient is not finite (NTP {ntp}, MATP {matp}, gradient norm {norm}); "
                       "nothing of this step was saved. Lower --learning-rate or set --grad-clip, then --resume from "
                       "the last checkpoint")
