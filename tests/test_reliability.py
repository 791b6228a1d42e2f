"""Nothing is lost and nothing silently useless runs: training into an old run's folder, --resume of another run's
checkpoint, fuse onto an existing folder, and settings that would train or sample nothing (issue 23)."""

import json

import mlx.core as mx
import numpy as np
import pytest

from mlx_sbd import load
from mlx_sbd.errors import SBDError
from mlx_sbd.samplers import make_token_sampler
from mlx_sbd.train import TrainConfig, train

FAST = dict(iters=6, batch_size=4, learning_rate=1e-2, warmup=2, steps_per_save=3, steps_per_eval=100, val_batches=1,
            block_size_max=8, num_layers=-1, compile=False, lora_parameters={"rank": 4, "scale": 2.0, "dropout": 0.0})


UNGATED = {"gated": False} if "gated" in TrainConfig.__dataclass_fields__ else {}  # fuse takes ungated adapters


def run(base, data, adapter_path, **overrides):
    model, tokenizer = load(base)
    cfg = TrainConfig(**{**FAST, "model": str(base), "data": str(data), "adapter_path": str(adapter_path), **overrides})
    return train(cfg, model, tokenizer)


def snapshot(folder):
    """{relative path: bytes} of every file under folder."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------- item 1: lost training
def test_reuse_then_resume_ends_in_an_error_and_the_old_adapter_untouched(setup, tmp_path):
    """The issue's sequence: a finished run in a folder, then a new run with other settings into the same folder,
    then that new run with --resume. Before, the second run silently mixed with the first and the resume wrote the
    old run's last checkpoint as the new run's adapter."""
    base, data = setup
    folder = tmp_path / "ad"
    run(base, data, folder)  # checkpoints 3 and 6
    before = snapshot(folder)
    assert "checkpoints/step_0000006/adapters.safetensors" in before
    new = dict(iters=3, learning_rate=1e-3)
    with pytest.raises(SBDError) as e:
        run(base, data, folder, **new)
    assert "already holds a training run" in str(e.value) and "--resume" in str(e.value)
    assert "--overwrite" in str(e.value) and "\n" not in str(e.value)
    assert snapshot(folder) == before
    with pytest.raises(SBDError) as e:
        run(base, data, folder, resume=True, **new)
    message = str(e.value)
    assert "other settings" in message and "--learning-rate 0.001 here, 0.01 there" in message, message
    assert "step_0000006" in message and "\n" not in message
    assert snapshot(folder) == before


def test_overwrite_starts_clean(setup, tmp_path):
    base, data = setup
    folder = tmp_path / "ad"
    run(base, data, folder, steps_per_report=1)
    (folder / "notes.txt").write_text("mine")  # not a run file: kept
    run(base, data, folder, iters=3, overwrite=True, steps_per_report=1)
    assert sorted(p.name for p in (folder / "checkpoints").iterdir()) == ["step_0000003"]  # none of the old run's
    steps = [r["step"] for r in map(json.loads, open(folder / "train_log.jsonl")) if "ntp" in r]
    assert steps == [1, 2, 3]
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["sbd"]["training"]["iters"] == 3
    assert (folder / "notes.txt").read_text() == "mine"
    with pytest.raises(SBDError, match="give only one"):
        TrainConfig(resume=True, overwrite=True).check()


def test_resume_may_train_longer_and_report_differently(setup, tmp_path):
    base, data = setup
    run(base, data, tmp_path / "grown", steps_per_report=1)  # 6 steps
    run(base, data, tmp_path / "grown", iters=9, resume=True, steps_per_report=1, steps_per_save=9)
    # The learning rate schedule follows --iters, so the grown run is not the 9-step one; what must hold is that it
    # continued from step 6 rather than starting again.
    steps = [r["step"] for r in map(json.loads, open(tmp_path / "grown" / "train_log.jsonl")) if "ntp" in r]
    assert steps == list(range(1, 10))
    assert sorted(p.name for p in (tmp_path / "grown" / "checkpoints").iterdir())[-1] == "step_0000009"
    with pytest.raises(SBDError, match="past --iters 4; give --iters 9 or more"):
        run(base, data, tmp_path / "grown", iters=4, resume=True)


def test_resume_refuses_an_adapter_without_checkpoints_and_init_adapter_into_itself(setup, tmp_path):
    import shutil

    base, data = setup
    folder = tmp_path / "ad"
    run(base, data, folder, iters=3)
    shutil.rmtree(folder / "checkpoints")
    before = snapshot(folder)
    with pytest.raises(SBDError, match="holds an adapter .* but no checkpoint"):
        run(base, data, folder, iters=3, resume=True)
    with pytest.raises(SBDError, match="is the --adapter-path this run writes to"):
        run(base, data, folder, iters=3, overwrite=True, init_adapter=str(folder))
    assert snapshot(folder) == before


def test_resume_before_the_first_checkpoint_starts_over_with_a_clean_log(setup, tmp_path):
    base, data = setup
    folder = tmp_path / "ad"
    folder.mkdir()
    (folder / "train_log.jsonl").write_text('{"step": 1, "ntp": 9.0}\n{"step": 2, "ntp": 9.0}\n')  # killed at step 2
    with pytest.raises(SBDError, match="already holds a training run \\(train_log.jsonl\\)"):
        run(base, data, folder, iters=3)
    run(base, data, folder, iters=3, resume=True, steps_per_report=1)
    steps = [r["step"] for r in map(json.loads, open(folder / "train_log.jsonl")) if "ntp" in r]
    assert steps == [1, 2, 3] and all(r.get("ntp") != 9.0 for r in map(json.loads, open(folder / "train_log.jsonl")))


# ---------------------------------------------------------------- item 2: fuse onto an existing folder
@pytest.fixture(scope="module")
def ungated_adapter(setup, tmp_path_factory):
    base, data = setup
    folder = tmp_path_factory.mktemp("fuse") / "ad"
    run(base, data, folder, iters=1, steps_per_save=1, **UNGATED)
    return folder


def test_fuse_refuses_an_existing_folder_unless_overwrite(setup, ungated_adapter, tmp_path, monkeypatch):
    from mlx_sbd import fuse as fuse_module
    from mlx_sbd.fuse import fuse

    base, _ = setup
    target = tmp_path / "fused"
    target.mkdir()
    (target / "keep.txt").write_text("old")
    with pytest.raises(SBDError, match="already exists and is not empty; pass --overwrite"):
        fuse(base, ungated_adapter, target)
    assert [p.name for p in target.iterdir()] == ["keep.txt"]

    def crash(*args, **kwargs):  # killed after the weights were written
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(fuse_module, "save_config", crash)
        with pytest.raises(KeyboardInterrupt):
            fuse(base, ungated_adapter, target, overwrite=True)
    assert [p.name for p in target.iterdir()] == ["keep.txt"]  # the old folder, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fused"]  # no temp folder left beside it

    fuse(base, ungated_adapter, target, overwrite=True)
    assert not (target / "keep.txt").exists() and (target / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fused"]
    model, _ = load(target)
    assert model.sbd is not None
    with pytest.raises(SBDError, match="holds the adapter folder"):
        fuse(base, ungated_adapter, ungated_adapter.parent, overwrite=True)


# ---------------------------------------------------------------- item 4: numbers that succeed producing nothing
@pytest.mark.parametrize("settings, flag", [
    (dict(learning_rate=float("nan")), "--learning-rate"),
    (dict(learning_rate=float("inf")), "--learning-rate"),
    (dict(learning_rate="1e-4"), "--learning-rate"),
    (dict(min_learning_rate=-1.0), "min_learning_rate"),
    (dict(weight_decay=float("nan")), "weight_decay"),
    (dict(lora_parameters={"rank": 0}), "--lora-rank"),
    (dict(lora_parameters={"rank": 2.5}), "--lora-rank"),
    (dict(lora_parameters={"dropout": 1.0}), "--lora-dropout"),
    (dict(lora_parameters={"dropout": -0.1}), "--lora-dropout"),
    (dict(lora_parameters={"dropout": float("nan")}), "--lora-dropout"),
    (dict(lora_parameters={"scale": float("nan")}), "--lora-scale"),
    (dict(max_seq_length=0), "--max-seq-length"),
    (dict(max_seq_length=1), "--max-seq-length"),
    (dict(val_batches=0), "--val-batches"),
    (dict(val_batches=-2), "--val-batches"),
    (dict(steps_per_report=0), "--steps-per-report"),
    (dict(steps_per_save=0), "--save-every"),
    (dict(iters=2.5), "--iters"),
    (dict(grad_clip=float("nan")), "--grad-clip"),
    (dict(warmup=-1), "--warmup"),
])
def test_train_settings_that_would_produce_nothing_are_refused(settings, flag):
    with pytest.raises(SBDError) as e:
        TrainConfig(**settings).check()
    message = str(e.value)
    assert message.startswith(flag) and "\n" not in message, message


def test_valid_edge_settings_pass():
    cfg = TrainConfig(learning_rate=0, val_batches=-1, max_seq_length=2, iters=np.int64(3),
                      lora_parameters={"rank": 1, "dropout": 0.99})
    cfg.check()
    assert cfg.lora_parameters == {"rank": 1, "scale": 20.0, "dropout": 0.99}


@pytest.mark.parametrize("kwargs, word", [
    (dict(temp=float("nan")), "temperature"),
    (dict(temp=float("inf")), "temperature"),
    (dict(temp="0.5"), "temperature"),
    (dict(top_p=float("nan")), "top-p"),
    (dict(top_k=2.5), "top-k"),
])
def test_token_sampler_refuses_non_finite_settings(kwargs, word):
    with pytest.raises(SBDError, match=word):
        make_token_sampler(**kwargs)


def test_token_sampler_takes_numpy_scalars():
    sampler = make_token_sampler(np.float32(0.5), np.float64(0.9), np.int64(3))
    ids = sampler(mx.log(mx.array([[0.1, 0.1, 0.1, 0.2, 0.5]])))
    assert ids.shape == (1,) and 0 <= ids.item() < 5


# --- the Python API and the adapter folder (issue 23 items 3, 4, 5, 6) ------------------------------------------
@pytest.fixture(scope="module")
def api_model(tmp_path_factory):
    import mlx_sbd
    from mlx_sbd.tiny import make_tiny_model

    import json

    folder = make_tiny_model(tmp_path_factory.mktemp("api") / "m", hidden_size=32, num_hidden_layers=1,
                             intermediate_size=64, num_attention_heads=2, num_key_value_heads=1)
    config = json.loads((folder / "tokenizer_config.json").read_text())  # a chat template, so messages get that far
    config["chat_template"] = "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}A:"
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return (folder, *mlx_sbd.load(folder))


@pytest.mark.parametrize("ids", [[5, 2**31], [5, 2**40], [5, -1], [5, -7], [5, 10**6]])
def test_out_of_range_token_ids_are_refused(api_model, ids):
    import mlx_sbd

    _, model, tokenizer = api_model
    with pytest.raises(SBDError, match="outside the vocabulary"):
        mlx_sbd.generate(model, tokenizer, ids, max_tokens=2)


@pytest.mark.parametrize("kwargs,match", [
    (dict(max_tokens=2.5), "max_tokens"), (dict(max_tokens="3"), "max_tokens"), (dict(gamma="0.1"), "gamma"),
    (dict(gamma=float("nan")), "gamma"), (dict(block_size=2.0), "block_size"),
])
def test_python_api_numbers_are_checked(api_model, kwargs, match):
    import mlx_sbd

    _, model, tokenizer = api_model
    with pytest.raises(SBDError, match=match):
        mlx_sbd.generate(model, tokenizer, [5, 6], **kwargs)


@pytest.mark.parametrize("prompt", [[{"role": "user"}], [{"role": "user", "content": 3}], [5, "a"], [5, 1.5]])
def test_bad_prompts_in_the_python_api(api_model, prompt):
    import mlx_sbd

    _, model, tokenizer = api_model
    with pytest.raises(SBDError):
        mlx_sbd.generate(model, tokenizer, prompt, max_tokens=2)


@pytest.mark.parametrize("name", ["adapters.safetensors", "sbd.safetensors"])
def test_truncated_adapter_files_are_refused(api_model, tmp_path, name):
    import mlx_sbd
    from mlx_sbd.adapter import make_trainable, save_adapter
    from mlx_sbd.loading import load_model

    folder = api_model[0]
    model = load_model(folder)
    make_trainable(model, "lora", -1, {"rank": 2, "scale": 1.0, "dropout": 0.0}, gated=True)
    save_adapter(model, tmp_path / "a", {"fine_tune_type": "lora", "gated": True, "num_layers": 1,
                                         "lora_parameters": {"rank": 2, "scale": 1.0, "dropout": 0.0}})
    path = tmp_path / "a" / name
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(SBDError, match=name):
        mlx_sbd.load(folder, adapter_path=tmp_path / "a")


@pytest.mark.slow
def test_kill_during_the_adapter_write_leaves_a_folder_that_loads_consistently_or_is_refused(api_model, tmp_path):
    """kill -9 a process that keeps rewriting an adapter folder, at several moments: every time the folder either
    loads, with the mask embedding and LoRA weights of one and the same save, or is refused in one line."""
    import signal
    import subprocess
    import sys
    import time

    import mlx.core as mx
    import mlx_sbd

    folder, target = api_model[0], tmp_path / "a"
    script = f"""
import mlx.core as mx
from mlx_sbd.adapter import make_trainable, save_adapter
from mlx_sbd.loading import load_model
model = load_model({str(folder)!r})
make_trainable(model, "lora", -1, {{"rank": 2, "scale": 1.0, "dropout": 0.0}}, gated=True)
i = 0
while True:
    i += 1
    model.mask_embedding = mx.full(model.mask_embedding.shape, float(i))
    model.lm.load_weights([(k, mx.full(v.shape, float(i))) for k, v in
                           __import__("mlx.utils").utils.tree_flatten(model.lm.trainable_parameters())], strict=False)
    save_adapter(model, {str(target)!r}, {{"fine_tune_type": "lora", "gated": True, "num_layers": 1,
                 "lora_parameters": {{"rank": 2, "scale": 1.0, "dropout": 0.0}}}})
    print(i, flush=True)
"""
    outcomes = set()
    for delay in (0.0, 0.003, 0.011, 0.029, 0.05, 0.1):
        proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        proc.stdout.readline()  # one complete save, then a kill somewhere in the following ones
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        try:
            model, _ = mlx_sbd.load(folder, adapter_path=target)
        except SBDError as e:
            assert "another save" in str(e)
            outcomes.add("refused")
            continue
        from mlx.utils import tree_flatten

        lora = {float(v.flatten()[0]) for k, v in tree_flatten(model.lm.parameters()) if "lora" in k}
        assert lora == {float(model.mask_embedding[0])}  # one save's weights, not two
        outcomes.add("loaded")
    assert "loaded" in outcomes


def test_a_non_finite_loss_stops_training_before_it_is_saved(setup, tmp_path):
    """A learning rate that blows the weights up: training stops with one error, and every saved weight is finite."""
    import mlx.core as mx
    import numpy as np

    from mlx_sbd import load
    from mlx_sbd.train import TrainConfig, train

    base, data = setup
    model, tokenizer = load(base, adapter_path=False)
    cfg = TrainConfig(model=str(base), data=str(data), adapter_path=str(tmp_path / "a"), iters=8, batch_size=4,
                      learning_rate=1e12, warmup=0, steps_per_save=1, steps_per_eval=100, val_batches=1,
                      block_size_max=4, num_layers=-1, compile=False, fine_tune_type="full", objective="ntp")
    with pytest.raises(SBDError, match="not finite"):
        train(cfg, model, tokenizer)
    for f in (tmp_path / "a").rglob("adapters.safetensors"):
        assert all(np.isfinite(np.array(v.astype(mx.float32))).all() for v in mx.load(str(f)).values()), f
