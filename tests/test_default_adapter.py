"""The SBD adapter shipped for the built-in SmolLM2: gated (the causal path is the base model), applied by default,
removable, and actually drafting.

The prompts below are about standard-library modules of the held-out split of scripts/make_distill_data.py
(never seen in training), so "several tokens per forward" is a property of the trained adapter, not of memory.
"""

import json

import numpy as np
import pytest
from click.testing import CliRunner
import mlx.core as mx

import mlx_sbd
from mlx_sbd.adapter import is_gated
from mlx_sbd.cli import cli
from mlx_sbd.loading import DEFAULT_ADAPTER

pytestmark = pytest.mark.slow
HELD_OUT = "What is the Python standard library module `sched` used for?"


def test_adapter_is_shipped_and_trained_for_the_built_in_model():
    config = json.loads((DEFAULT_ADAPTER / "adapter_config.json").read_text())
    base, _ = mlx_sbd.load(adapter_path=False)
    assert config["sbd"]["base"] == {k: getattr(base.args, k) for k in config["sbd"]["base"]}
    assert config["gated"] is True  # the default's output is the base model's (verified decoding)
    assert (DEFAULT_ADAPTER / "README.md").read_text().count("mlx-sbd train") >= 1  # the recipe ships with it
    # The recorded training paths are the recipe's (relative, as a user reproducing it has them), not the machine's.
    training = config["sbd"]["training"]
    for key in ("data", "adapter_path", "init_adapter"):
        assert training.get(key) is None or not training[key].startswith("/"), (key, training[key])


def test_load_without_arguments_applies_it_and_false_removes_it():
    """load() applies the gated LoRA (never fused: it acts on mask rows only), so the causal forward is the plain
    base model's, and the mask rows are not."""
    model, _ = mlx_sbd.load()
    plain, _ = mlx_sbd.load(adapter_path=False)
    assert model.sbd is not None and plain.sbd is None and is_gated(model) and not is_gated(plain)
    x = mx.array([[1, 2, 3, 4, 5]])
    assert np.array_equal(np.array(model(x)), np.array(plain(x)))
    masked = mx.array([1, 2, 3, -1, -1])
    a = model.forward(masked, mask=mx.ones((5, 5), mx.bool_), mask_rows=2, return_hidden=True)
    b = plain.forward(masked, mask=mx.ones((5, 5), mx.bool_), mask_rows=2, return_hidden=True)
    assert np.abs(np.array(a[3:]) - np.array(b[3:])).max() > 1e-3


def test_the_adapters_drafts_pass():
    """With the mask block's drafts every forward, verified decoding takes fewer forwards than tokens on a held-out
    prompt. (`--draft auto`, the default, sends them only when their expected gain pays for their rows.) The
    stage-2 adapter drafts ~1.8 tokens per forward on held-out chat (BENCHMARKS 8); stage 1 drafted ~1.3."""
    model, tokenizer = mlx_sbd.load()
    *_, last = mlx_sbd.stream_generate(model, tokenizer, HELD_OUT, max_tokens=64, draft="sbd",
                                       block_size=model.sbd.block_size, gamma=model.sbd.gamma)
    assert last.generation_tokens >= 32
    assert last.generation_tokens / last.nfe >= 1.4, (last.generation_tokens, last.nfe)


def test_cli_uses_the_adapter_by_default_and_block_size_one_for_the_baseline():
    model, _ = mlx_sbd.load()
    default = CliRunner().invoke(cli, ["generate", "-p", HELD_OUT, "-m", "24"])
    assert default.exit_code == 0, default.output
    # --draft auto (the default) offers every guess of the mask block: gamma inf unless given
    assert f"Block size: {model.sbd.block_size}, gamma: inf" in default.output
    ntp = CliRunner().invoke(cli, ["generate", "-p", HELD_OUT, "-m", "24", "--block-size", "1"])
    assert "Block size: 1" in ntp.output and "1.00 tokens per forward" in ntp.output, ntp.output
    plain = CliRunner().invoke(cli, ["generate", "-p", HELD_OUT, "-m", "8", "--no-adapter"])
    assert "no SBD adapter" in plain.output and "Block size: 1" in plain.output
    both = CliRunner().invoke(cli, ["generate", "-p", "hi", "--no-adapter", "--adapter-path", "x"])
    assert both.exit_code == 2 and "exclude each other" in both.output
