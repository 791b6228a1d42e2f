"""Data-parallel training (train.py under `mlx.launch`): sharding, loss shares, and 2 processes = 1 process.

The reference is the single-process trainer: a global batch split over ranks must give its loss and its
gradient (the shares summed), and 2 ring-back-end processes on 127.0.0.1 must end at its adapter. The launched
runs use --no-compile and one BLAS thread per rank: the machine has 2 cores.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlx_sbd import load
from mlx_sbd.batches import make_batch
from mlx_sbd.errors import SBDError
from mlx_sbd.loss import loss_for, sbd_loss
from mlx_sbd.train import TrainConfig, label_totals, shard, shard_loss, shard_rows, train

SETTINGS = dict(iters=6, batch_size=4, learning_rate=1e-2, warmup=2, steps_per_save=3, steps_per_eval=4,
                val_batches=1, block_size_max=8, grad_accumulation_steps=2, num_layers=-1, compile=False,
                lora_parameters={"rank": 4, "scale": 2.0, "dropout": 0.0})  # LoRA dropout keys are per rank
FLAGS = ["--iters", "6", "--batch-size", "4", "--learning-rate", "1e-2", "--warmup", "2", "--save-every", "3",
         "--steps-per-eval", "4", "--val-batches", "1", "--block-size-max", "8", "--grad-accumulation-steps", "2",
         "--num-layers", "-1", "--lora-rank", "4", "--lora-scale", "2.0", "--lora-dropout", "0", "--no-compile"]
# Measured noise floor: the same single-process run with 1 vs 2 BLAS threads ends 1.4e-4 apart (Adam turns the
# rounding of near-zero gradient entries into lr-sized steps). Averaging per-rank means instead (tried once with a
# patched shard_loss) ends 0.2 away.
ATOL = 5e-4
LAUNCH_TIMEOUT = 300  # seconds; a hung ring never blocks CI

# Rank 1 dies hard (SIGKILL, like a Mac losing power) on its 11th make_batch call: the first micro-batch of the
# 5th step, after rank 0 wrote checkpoint step 3 (rank 1 cannot pass step 4's all_sum before rank 0 has).
DYING_WORKER = """
import os, signal, sys
import mlx.core as mx
import mlx_sbd.train as train_module
from mlx_sbd.cli import cli

real_make_batch, calls = train_module.make_batch, [0]

def dying_make_batch(*args, **kwargs):
    calls[0] += 1
    if calls[0] == 11 and mx.distributed.init().rank() == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    return real_make_batch(*args, **kwargs)

train_module.make_batch = dying_make_batch
cli(sys.argv[1:])
"""


@pytest.fixture(scope="module")
def reference(setup, tmp_path_factory):
    """The uninterrupted single-process run (in this process) that every launched run must reproduce."""
    base, data = setup
    adapter_path = tmp_path_factory.mktemp("reference") / "one"
    model, tokenizer = load(base)
    train(TrainConfig(model=str(base), data=str(data), adapter_path=str(adapter_path), **SETTINGS), model, tokenizer)
    return adapter_path


def test_shard_rows_split_the_global_batch():
    rows = [range(8)[shard_rows(8, rank, 4)] for rank in range(4)]
    assert [list(r) for r in rows] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert shard_rows(4, 0, 1) == slice(0, 4)
    with pytest.raises(SBDError, match="--batch-size 6 does not split evenly over 4 processes"):
        shard_rows(6, 1, 4)


def test_shard_losses_and_gradients_sum_to_the_global_batch(setup):
    """Two shards of a batch with very different label counts: the shares add up to sbd_loss of the whole
    batch (the per-token mean over all rows) and so do their gradients; the naive mean of per-shard means
    does not, so the check can fail."""
    base, _ = setup
    model, _ = load(base)
    seqs = [(list(range(4, 4 + n)) + [2], 0) for n in (3, 5, 20, 27)]  # shard 0 short, shard 1 long
    k = 4
    batch = make_batch(seqs, k, np.random.default_rng(3))
    totals = label_totals(batch)

    (_, ntp, matp, _), grad = nn.value_and_grad(model, sbd_loss)(model, batch)
    shares, grads, means = np.zeros(2), [], []
    for rows in (shard_rows(4, 0, 2), shard_rows(4, 1, 2)):
        part = shard(batch, seqs, k, rows)
        for key in ("tokens", "matp_weights", "ntp_targets"):  # the same noise as the global batch
            np.testing.assert_array_equal(np.array(part[key]), np.array(batch[key][rows]))
        np.testing.assert_array_equal(np.array(part["mask"]), np.array(batch["mask"][rows]))
        (_, n, m, _), g = nn.value_and_grad(model, shard_loss)(model, part, totals, loss_for("sbd", False))
        shares += (n.item(), m.item())
        grads.append(dict(tree_flatten(g)))
        means.append(sbd_loss(model, part)[1].item())

    np.testing.assert_allclose(shares, [ntp.item(), matp.item()], rtol=1e-5)
    assert abs(np.mean(means) - ntp.item()) > 1e-2  # averaging per-rank means would be a different loss
    for key, g in tree_flatten(grad):
        total = np.array(grads[0][key]) + np.array(grads[1][key])
        np.testing.assert_allclose(total, np.array(g), rtol=1e-4, atol=1e-6 * np.abs(np.array(g)).max())


def free_ports() -> int:
    """A starting port p with p and p+1 free on 127.0.0.1 (the ring back-end listens on one per rank)."""
    for _ in range(100):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port < 65535:
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port + 1))
                except OSError:
                    continue
            return port
    raise RuntimeError("no two consecutive free ports")


def launch(n: int, command: list, timeout: int = LAUNCH_TIMEOUT) -> str:
    """Run `command` on n local ranks with `mlx.launch --backend ring`; returns stdout+stderr. On timeout the
    launcher and every rank (one process group) are killed and the test fails. stdin is a pipe left open: at
    EOF (/dev/null) the launcher's input loop spins and burns a core."""
    launcher = str(Path(sys.executable).with_name("mlx.launch"))
    hosts = ",".join(["127.0.0.1"] * n)
    cmd = [launcher, "--backend", "ring", "--hosts", hosts, "--starting-port", str(free_ports()), *command]
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1")
    with tempfile.TemporaryFile("w+") as out:
        proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=out, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            pytest.fail(f"mlx.launch did not finish in {timeout} s: {' '.join(cmd)}")
        finally:
            proc.stdin.close()
        out.seek(0)
        return out.read()


def train_command(base, data, adapter_path, *extra):
    return [sys.executable, "-m", "mlx_sbd", "train", "--model", str(base), "--data", str(data),
            "--adapter-path", str(adapter_path), *FLAGS, *extra]


def assert_same_adapter(expected: Path, actual: Path):
    for name in ("adapters.safetensors", "sbd.safetensors"):
        a, b = mx.load(str(expected / name)), mx.load(str(actual / name))
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_allclose(np.array(b[key]), np.array(a[key]), rtol=0, atol=ATOL, err_msg=key)


def read_log(adapter_path: Path) -> list:
    return [json.loads(line) for line in (adapter_path / "train_log.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_two_processes_equal_one(setup, reference, tmp_path):
    base, data = setup
    out = launch(2, train_command(base, data, tmp_path / "two"))
    assert (tmp_path / "two" / "adapters.safetensors").is_file(), out
    assert_same_adapter(reference, tmp_path / "two")
    one, two = read_log(reference), read_log(tmp_path / "two")
    assert [r.keys() for r in two] == [r.keys() for r in one]  # rank 0 alone logged: no duplicated lines
    for a, b in zip(one, two):  # losses reported as global per-token means, like the single process
        for key in ("val_ntp", "val_matp", "ntp", "matp"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-5), key
    assert sorted(p.name for p in (tmp_path / "two" / "checkpoints").iterdir()) == ["step_0000003", "step_0000006"]
    assert out.count("val_ntp") == 2  # two evaluations, printed once each (rank 0)


@pytest.mark.slow
def test_killed_two_process_run_resumes_to_the_single_process_result(setup, reference, tmp_path):
    base, data = setup
    worker = tmp_path / "dying_worker.py"
    worker.write_text(DYING_WORKER)
    killed = tmp_path / "killed"
    out = launch(2, [sys.executable, str(worker), "train", "--model", str(base), "--data", str(data),
                     "--adapter-path", str(killed), *FLAGS])
    assert sorted(p.name for p in (killed / "checkpoints").iterdir()) == ["step_0000003"], out

    out = launch(2, train_command(base, data, killed, "--resume"))
    assert "Resuming from" in out and "step 3" in out, out
    assert (killed / "checkpoints" / "step_0000006").is_dir(), out
    assert_same_adapter(reference, killed)
