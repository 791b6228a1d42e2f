"""The `mlx-sbd` command line: help for every command, generate end to end, one-line errors."""

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


def test_generate_reads_prompt_from_stdin(tiny):
    result = CliRunner().invoke(cli, ["generate", "--model", tiny, "-p", "-", "-m", "4", "--quiet"], input="1+1=")
    assert result.exit_code == 0, result.output


def test_untrained_model_defaults_to_one_token_per_forward(tiny):
    result = CliRunner().invoke(cli, ["generate", "--model", tiny, "-p", "1+1=", "-m", "6"])
    assert "no SBD adapter" in result.output and "Block size: 1" in result.output


@pytest.mark.parametrize("args,message", [
    (["--model", "/no/such/model"], "model not found"),
    (["-k", "0"], "block_size"),
    (["--gamma", "-1"], "gamma"),
    (["-m", "0"], "max_tokens"),
    (["--adapter-path", "/no/such/adapter"], "adapter"),
])
def test_generate_errors_are_one_line(tiny, args, message):
    args = args if "--model" in args else ["--model", tiny] + args
    result = CliRunner().invoke(cli, ["generate", "-p", "hi"] + args)
    assert result.exit_code == 1
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and message in errors[0], result.output
