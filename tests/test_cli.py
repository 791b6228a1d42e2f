"""The `mlx-sbd` command line: help for every command, generate end to end, one-line errors."""

import json
import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from mlx_sbd.cli import COMMANDS, cli
from mlx_sbd.tiny import make_tiny_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return str(make_tiny_model(tmp_path_factory.mktemp("m"), hidden_size=32, num_hidden_layers=1,
                               intermediate_size=64))


@pytest.mark.parametrize("name", COMMANDS)
def test_every_command_has_help(name):
    result = CliRunner().invoke(cli, [name, "--help"])
    assert result.exit_code == 0 and "Usage:" in result.output


def test_generate_prints_text_and_stats(tiny):
    result = CliRunner().invoke(cli, ["generate", "--model", tiny, "-p", "12+3=", "-m", "10", "-k", "4"])
    assert result.exit_code == 0, result.output
    assert "Forward passes:" in result.output and "tokens per forward" in result.output


def prompt_tokens(result) -> int:
    return int(re.search(r"^Prompt: (\d+) tokens", result.output, re.M).group(1))


def test_generate_reads_prompt_from_stdin(tiny):
    """`-p -` takes the prompt from stdin: the same prompt (token count, then text) as passing that text with -p.
    Taking '-' itself as the prompt would give a 1-token prompt (the tiny tokenizer has one token per character)."""
    text = "12+3=45"
    runner = CliRunner()
    piped = runner.invoke(cli, ["generate", "--model", tiny, "-p", "-", "-m", "3"], input=text)
    direct = runner.invoke(cli, ["generate", "--model", tiny, "-p", text, "-m", "3"])
    assert piped.exit_code == 0 and direct.exit_code == 0, piped.output + direct.output
    assert prompt_tokens(piped) == prompt_tokens(direct) == len(text)
    assert piped.stdout.splitlines()[0] == direct.stdout.splitlines()[0]  # the generated text
    dash = runner.invoke(cli, ["generate", "--model", tiny, "-p", "-", "-m", "3"], input="-")
    assert prompt_tokens(dash) == 1  # the measure above tells a 7-character prompt from '-'


def test_prompt_that_is_not_utf8_is_one_line_error(tiny):
    runner = CliRunner()
    piped = runner.invoke(cli, ["generate", "--model", tiny, "-p", "-", "-m", "3"], input=b"12\xff=")
    assert piped.exit_code == 1 and "Traceback" not in piped.output
    assert piped.output.startswith("Error: the prompt from stdin is not UTF-8 text (byte 0xff at offset 2)")
    argv = runner.invoke(cli, ["generate", "--model", tiny, "-p", "12\udcff=", "-m", "3"])  # how Python passes b"\xff"
    assert argv.exit_code == 1 and argv.output.startswith("Error: the prompt from --prompt is not UTF-8 text")


def test_block_size_above_the_trained_maximum_warns(tiny, tmp_path):
    import shutil

    import mlx.core as mx

    folder = Path(shutil.copytree(tiny, tmp_path / "sbd"))  # a fused SBD model trained with blocks of up to 4
    config = json.loads((folder / "config.json").read_text())
    config["sbd"] = {"block_size_max": 4, "block_size": 4, "gamma": 0.1}
    (folder / "config.json").write_text(json.dumps(config))
    mx.save_safetensors(str(folder / "sbd.safetensors"), {"mask_embedding": mx.zeros((config["hidden_size"],))})
    args = ["generate", "--model", str(folder), "-p", "12+3=", "-m", "4", "--quiet"]
    over = CliRunner().invoke(cli, args + ["-k", "8"])
    assert over.exit_code == 0, over.output
    assert "Warning: --block-size 8 is above the largest block this model's SBD training used (4)" in over.output
    within = CliRunner().invoke(cli, args + ["-k", "4"])
    assert within.exit_code == 0 and "Warning" not in within.output, within.output


def test_untrained_model_drafts_with_prompt_lookup(tiny):
    """No SBD adapter: auto drafts from the text's own n-grams; --draft none is one token per forward; same text."""
    auto = CliRunner().invoke(cli, ["generate", "--model", tiny, "-p", "1+1=1+1=1+1=", "-m", "12"])
    plain = CliRunner().invoke(cli, ["generate", "--model", tiny, "-p", "1+1=1+1=1+1=", "-m", "12", "--draft", "none"])
    assert auto.exit_code == plain.exit_code == 0
    assert "no SBD adapter" in auto.output and "drafts: auto (prompt lookup)" in auto.output
    assert "drafts: none" in plain.output and "Forward passes: 12," in plain.output
    assert auto.output.splitlines()[1] == plain.output.splitlines()[0]  # the text (after auto's note line)


@pytest.mark.parametrize("args,message", [
    (["--model", "/no/such/model"], "model not found"),
    (["-k", "0"], "block_size"),
    (["--gamma", "-1"], "gamma"),
    (["-m", "0"], "max_tokens"),
    (["--adapter-path", "/no/such/adapter"], "adapter"),
    (["--draft", "lookup", "--lossy"], "verified decoding"),
    (["--draft", "sbd", "-k", "1"], "mask block"),
])
def test_generate_errors_are_one_line(tiny, args, message):
    args = args if "--model" in args else ["--model", tiny] + args
    result = CliRunner().invoke(cli, ["generate", "-p", "hi"] + args)
    assert result.exit_code == 1
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and message in errors[0], result.output
