"""The SBD adapter shipped for the built-in SmolLM2: applied by default, removable, and actually decoding blocks.

The prompts below are about standard-library modules of the held-out split of scripts/make_distill_data.py
(never seen in training), so "several tokens per forward" is a property of the trained adapter, not of memory.
"""

import json

import numpy as np
import pytest
from click.testing import CliRunner
from mlx_lm.tuner.lora import LoRALinear

import mlx_sbd
from mlx_sbd.cli import cli
from mlx_sbd.loading import DEFAULT_ADAPTER

pytestmark = pytest.mark.slow
HELD_OUT = "What is the Python standard library module `sched` used for?"


def first_q_proj(model):
    return np.array(model.lm.model.layers[0].self_attn.q_proj.weight)


def test_adapter_is_shipped_and_trained_for_the_built_in_model():
    config = json.loads((DEFAULT_ADAPTER / "adapter_config.json").read_text())
    base, _ = mlx_sbd.load(adapter_path=False)
    assert config["sbd"]["base"] == {k: getattr(base.args, k) for k in config["sbd"]["base"]}
    assert (DEFAULT_ADAPTER / "README.md").read_text().count("mlx-sbd train") >= 1  # the recipe ships with it
    # The recorded training paths are the recipe's (relative, as a user reproducing it has them), not the machine's.
    training = config["sbd"]["training"]
    for key in ("data", "adapter_path", "init_adapter"):
        assert training.get(key) is None or not training[key].startswith("/"), (key, training[key])


def test_load_without_arguments_applies_it_and_false_removes_it():
    """load() fuses the LoRA into the weights (plain Linear layers, base cost per forward)."""
    model, _ = mlx_sbd.load()
    plain, _ = mlx_sbd.load(adapter_path=False)
    assert model.sbd is not None and plain.sbd is None
    assert not any(isinstance(m, LoRALinear) for _, m in model.lm.named_modules())
    assert np.abs(first_q_proj(model) - first_q_proj(plain)).max() > 1e-3


def test_default_decoding_takes_fewer_forwards_than_tokens():
    model, tokenizer = mlx_sbd.load()
    *_, last = mlx_sbd.stream_generate(model, tokenizer, HELD_OUT, max_tokens=64,
                                       block_size=model.sbd.block_size, gamma=model.sbd.gamma)
    assert last.generation_tokens >= 32
    # The plain base reveals under one token per forward at these settings (BENCHMARKS.md); the adapter more than one.
    assert last.generation_tokens / last.nfe >= 1.15, (last.generation_tokens, last.nfe)


def test_cli_uses_the_adapter_by_default_and_block_size_one_for_the_baseline():
    model, _ = mlx_sbd.load()
    default = CliRunner().invoke(cli, ["generate", "-p", HELD_OUT, "-m", "24"])
    assert default.exit_code == 0, default.output
    assert f"Block size: {model.sbd.block_size}, gamma: {model.sbd.gamma:g}" in default.output
    ntp = CliRunner().invoke(cli, ["generate", "-p", HELD_OUT, "-m", "24", "--block-size", "1"])
    assert "Block size: 1" in ntp.output and "1.00 tokens per forward" in ntp.output, ntp.output
    plain = CliRunner().invoke(cli, ["generate", "-p", HELD_OUT, "-m", "8", "--no-adapter"])
    assert "no SBD adapter" in plain.output and "Block size: 1" in plain.output
    both = CliRunner().invoke(cli, ["generate", "-p", "hi", "--no-adapter", "--adapter-path", "x"])
    assert both.exit_code == 2 and "exclude each other" in both.output
