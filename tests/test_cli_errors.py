"""Every bad input of issue 23 through the real `mlx-sbd` command (a subprocess, as a user runs it): a non-zero exit,
stderr exactly one line starting with "Error:", no traceback, and nothing lost (an earlier run, a fused folder).

Python warnings are silenced in the subprocess (PYTHONWARNINGS=ignore) so that stderr holds what the command itself
prints: a machine without OpenBLAS would otherwise add the slow-BLAS warning (backend.py) to every case.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # one mlx-sbd process per case (~5-10 s each on 2 cores)

CHAT_TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}:{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<s>assistant:{% endif %}")


def mlx_sbd(*args, stdin: bytes = b"", cwd=None):
    """Run the installed `mlx-sbd` entry point (argv as bytes where given) -> CompletedProcess."""
    exe = shutil.which("mlx-sbd", path=os.path.dirname(sys.executable)) or shutil.which("mlx-sbd")
    argv = [exe, *[a if isinstance(a, bytes) else str(a) for a in args]]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run(argv, input=stdin, capture_output=True, env=env, cwd=cwd, timeout=300)


def assert_one_line_error(result, *words):
    err = result.stderr.decode("utf-8", "replace")
    assert result.returncode != 0, err
    assert "Traceback" not in err and "Traceback" not in result.stdout.decode("utf-8", "replace"), err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), err
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny base (and a copy with a chat template), its data, a finished ungated run and a fused folder."""
    from mlx_sbd import load
    from mlx_sbd.tasks import alphabet, write_dataset
    from mlx_sbd.tiny import make_tiny_model
    from mlx_sbd.train import TrainConfig, train

    root = tmp_path_factory.mktemp("cli-errors")
    base = make_tiny_model(root / "base", alphabet=alphabet("reverse"), hidden_size=32, num_hidden_layers=1,
                           num_attention_heads=2, num_key_value_heads=1, intermediate_size=64)
    data = write_dataset(root / "data", "reverse", 24, 4, 4, seed=0, min_len=3, max_len=8)
    chat = Path(shutil.copytree(base, root / "chat"))
    config = json.loads((chat / "tokenizer_config.json").read_text())
    (chat / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": CHAT_TEMPLATE}))
    run = root / "run"
    model, tokenizer = load(base)
    train(TrainConfig(model=str(base), data=str(data), adapter_path=str(run), iters=2, steps_per_save=1,
                      batch_size=4, num_layers=-1, compile=False,
                      **({"gated": False} if "gated" in TrainConfig.__dataclass_fields__ else {}),  # fusable
                      lora_parameters={"rank": 2, "scale": 2.0, "dropout": 0.0}), model, tokenizer)
    notok = root / "notok"
    notok.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(base / name, notok / name)
    fused = root / "fused"
    fused.mkdir()
    (fused / "mine.txt").write_text("keep me")
    return dict(root=root, base=base, data=data, chat=chat, run=run, notok=notok, fused=fused)


def data_folder(world, name: str, lines) -> Path:
    """train.jsonl: four good lines (a full batch, so nothing else fails), then `lines`."""
    folder = world["root"] / name
    folder.mkdir(exist_ok=True)
    lines = [{"text": f"good line {i}"} for i in range(4)] + list(lines)
    body = b"".join((line if isinstance(line, bytes) else json.dumps(line).encode()) + b"\n" for line in lines)
    (folder / "train.jsonl").write_bytes(body)
    return folder


def train_args(world, *extra, data=None, model=None, adapter=None):
    adapter = adapter or world["root"] / "new-adapter"
    return ["train", "--model", model or world["base"], "--data", data or world["data"], "--adapter-path", adapter,
            "--iters", "2", "--batch-size", "4", "--no-compile", *extra]


# ---------------------------------------------------------------- train: numbers that would train nothing
@pytest.mark.parametrize("flags, flag", [
    (["--learning-rate", "nan"], "--learning-rate"),
    (["--lora-rank", "0"], "--lora-rank"),
    (["--max-seq-length", "0"], "--max-seq-length"),
    (["--max-seq-length", "1"], "--max-seq-length"),
    (["--val-batches", "0"], "--val-batches"),
    (["--lora-dropout", "1"], "--lora-dropout"),
    (["--lora-dropout", "-0.5"], "--lora-dropout"),
    (["--steps-per-report", "0"], "--steps-per-report"),
    (["--save-every", "0"], "--save-every"),
])
def test_train_numbers(world, flags, flag):
    assert_one_line_error(mlx_sbd(*train_args(world, *flags)), flag)
    assert not (world["root"] / "new-adapter").exists()


# ---------------------------------------------------------------- train: an earlier run is never lost
def test_train_into_a_finished_run_then_resume_with_other_settings(world):
    before = snapshot(world["run"])
    assert_one_line_error(mlx_sbd(*train_args(world, "--learning-rate", "1e-3", adapter=world["run"])),
                          "already holds a training run", "--resume", "--overwrite")
    assert snapshot(world["run"]) == before
    assert_one_line_error(mlx_sbd(*train_args(world, "--learning-rate", "1e-3", "--resume", adapter=world["run"])),
                          "--resume", "other settings", "--learning-rate")
    assert snapshot(world["run"]) == before


# ---------------------------------------------------------------- train: bad data files
@pytest.mark.parametrize("name, lines, model, words", [
    ("latin1", [b'{"text": "caf\xe9"}'], "base", ["train.jsonl:5:", "not UTF-8"]),
    ("nocontent", [{"messages": [{"role": "user"}]}], "chat", ["train.jsonl:5:", "message 1 has no 'content'"]),
    ("listcontent", [{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": ["b"]}]}],
     "chat", ["train.jsonl:5:", "message 2 has a non-string 'content'"]),
])
def test_train_bad_data(world, name, lines, model, words):
    folder = data_folder(world, name, lines)
    assert_one_line_error(mlx_sbd(*train_args(world, data=folder, model=world[model])), *words)


# ---------------------------------------------------------------- fuse onto an existing folder
def test_fuse_onto_an_existing_folder(world):
    result = mlx_sbd("fuse", "--model", world["base"], "--adapter-path", world["run"], "--save-path", world["fused"])
    assert_one_line_error(result, "already exists", "--overwrite")
    assert snapshot(world["fused"]) == {"mine.txt": b"keep me"}


# ---------------------------------------------------------------- generate
def test_generate_temp_nan(world):
    assert_one_line_error(mlx_sbd("generate", "--model", world["base"], "-p", "hi", "-m", "2", "--temp", "nan"),
                          "temperature")


def test_generate_model_without_tokenizer(world):
    assert_one_line_error(mlx_sbd("generate", "--model", world["notok"], "-p", "hi", "-m", "2"), "no tokenizer")


def test_generate_prompt_not_utf8_on_stdin(world):
    result = mlx_sbd("generate", "--model", world["base"], "-p", "-", "-m", "2", stdin=b"R: \xff\xfe=")
    assert_one_line_error(result, "stdin", "not UTF-8")


def test_generate_prompt_not_utf8_in_argv(world):
    result = mlx_sbd("generate", "--model", world["base"], "-p", b"R: \xff=", "-m", "2")
    assert_one_line_error(result, "--prompt", "not UTF-8")


# ---------------------------------------------------------------- convert / load a broken GGUF
@pytest.fixture(scope="module")
def broken_gguf(world):
    pytest.importorskip("gguf")
    import struct

    from test_gguf import write_gguf

    good = world["root"] / "good.gguf"
    write_gguf(good)
    cut = world["root"] / "cut.gguf"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    corrupt = world["root"] / "corrupt.gguf"
    corrupt.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 1, 1) + struct.pack("<Q", 2**63) + b"x" * 64)
    return dict(cut=cut, corrupt=corrupt)


@pytest.mark.parametrize("kind", ["corrupt", "cut"])
def test_convert_broken_gguf(world, broken_gguf, kind):
    out = world["root"] / f"out-{kind}"
    result = mlx_sbd("convert", "--gguf", broken_gguf[kind], "--mlx-path", out)
    line = assert_one_line_error(result, f"{kind}.gguf", "re-download it")
    assert ("is truncated" if kind == "cut" else "not a readable GGUF file") in line
    assert not out.exists()
