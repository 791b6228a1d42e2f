"""SBD adapters and fusing: round trip, mlx_lm compatibility, fingerprint errors, fused folders."""

import json

import mlx.core as mx
import mlx_lm
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_map

from mlx_sbd import load
from mlx_sbd.adapter import load_adapter, make_trainable, save_adapter
from mlx_sbd.errors import SBDError
from mlx_sbd.fuse import fuse
from mlx_sbd.masks import training_mask
from mlx_sbd.model import MASK_ID
from mlx_sbd.tiny import make_tiny_model

TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128)
LORA = {"rank": 4, "scale": 2.0, "dropout": 0.0}
CONFIG = {"fine_tune_type": "lora", "num_layers": 2, "lora_parameters": LORA, "sbd": {"block_size_max": 8}}
TOKENS = mx.array([[5, 9, 14, 20, 33, 7, 8, 11]])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny base and an adapter with non-zero LoRA weights and a moved mask embedding."""
    root = tmp_path_factory.mktemp("adapter")
    base = make_tiny_model(root / "base", **TINY)
    model, _ = load(base)
    make_trainable(model, "lora", 2, LORA)
    mx.random.seed(3)
    model.lm.update(tree_map(lambda x: 0.1 * mx.random.normal(x.shape), model.lm.trainable_parameters()))
    model.mask_embedding = mx.random.normal(model.mask_embedding.shape)
    save_adapter(model, root / "ad", CONFIG)
    return base, root / "ad", model


def sbd_logits(model):
    tokens = mx.concatenate([TOKENS, mx.array([[5, MASK_ID, MASK_ID, 20, MASK_ID, 7, MASK_ID, MASK_ID]])], axis=1)
    return np.array(model.forward(tokens, positions=mx.tile(mx.arange(8), 2), mask=training_mask(8, 4)))


def test_round_trip(trained):
    base, path, model = trained
    assert sorted(p.name for p in path.iterdir()) == ["adapter_config.json", "adapters.safetensors", "sbd.safetensors"]
    config = json.loads((path / "adapter_config.json").read_text())
    assert config["sbd"]["mask"] == "learned_embedding"
    assert config["sbd"]["base"] == {"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2, "vocab_size": model.args.vocab_size}
    assert set(mx.load(str(path / "sbd.safetensors"))) == {"mask_embedding"}
    loaded, _ = load(base)
    load_adapter(loaded, path)  # unfused: the stored weights come back bit for bit
    np.testing.assert_array_equal(sbd_logits(loaded), sbd_logits(model))
    assert loaded.sbd is not None and loaded.sbd.block_size_max == 8


def test_mlx_lm_loads_the_adapter(trained):
    """The adapter keys are mlx_lm's: mlx_lm.load(base, adapter_path) gives the same plain causal logits."""
    base, path, model = trained
    ref, _ = mlx_lm.load(str(base), adapter_path=str(path))
    np.testing.assert_allclose(np.array(ref(TOKENS)), np.array(model(TOKENS)), rtol=1e-5, atol=1e-5)
    base_only, _ = load(base)
    assert not np.allclose(np.array(base_only(TOKENS)), np.array(model(TOKENS)))  # the adapter does something


def test_errors(trained, tmp_path):
    base, path, _ = trained
    other = make_tiny_model(tmp_path / "other", **dict(TINY, num_hidden_layers=3))
    with pytest.raises(SBDError, match="different base model"):
        load(other, adapter_path=path)
    with pytest.raises(SBDError, match="adapter folder not found"):
        load(base, adapter_path=tmp_path / "missing")
    (tmp_path / "partial").mkdir()
    (tmp_path / "partial" / "adapter_config.json").write_text("{}")
    with pytest.raises(SBDError, match="no adapters.safetensors"):
        load(base, adapter_path=tmp_path / "partial")


def test_fuse(trained, tmp_path):
    base, path, model = trained
    out = fuse(base, path, tmp_path / "fused")
    fused, _ = load(out)  # no adapter needed
    np.testing.assert_allclose(sbd_logits(fused), sbd_logits(model), rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(np.array(fused.mask_embedding), np.array(model.mask_embedding))
    assert fused.sbd is not None and fused.sbd.block_size_max == 8
    plain, _ = mlx_lm.load(str(out))  # still a normal mlx_lm model folder
    np.testing.assert_allclose(np.array(plain(TOKENS)), np.array(model(TOKENS)), rtol=1e-4, atol=1e-4)
    with pytest.raises(SBDError, match="is the base model folder"):
        fuse(base, path, base)


def test_adapter_stored_in_float16_takes_the_model_dtype(trained, tmp_path):
    """A half-precision copy (how the default adapter ships) loads as float32 LoRA weights into a float32 model
    and gives the float32 adapter's logits up to float16 rounding of the weights."""
    from mlx_sbd.adapter import ADAPTER_WEIGHTS, copy_adapter

    base, adapter, trained_model = trained
    half = tmp_path / "half"
    copy_adapter(adapter, half, dtype=mx.float16)
    weights = mx.load(str(adapter / ADAPTER_WEIGHTS))
    assert {v.dtype for v in mx.load(str(half / ADAPTER_WEIGHTS)).values()} == {mx.float16}
    model, _ = load(base, adapter_path=False)
    load_adapter(model, half)
    lora = {k: v for k, v in tree_flatten(model.lm.parameters()) if k in weights}
    assert lora.keys() == weights.keys() and {v.dtype for v in lora.values()} == {mx.float32}
    np.testing.assert_allclose(sbd_logits(model), sbd_logits(trained_model), atol=5e-3)


def test_load_fuses_the_lora_into_plain_linears(trained):
    """load(base, adapter) decodes with fused weights: no LoRA layer left, same logits as the unfused LoRA model."""
    from mlx_lm.tuner.lora import LoRALinear

    base, adapter, trained_model = trained
    model, _ = load(base, adapter_path=adapter)
    assert not any(isinstance(m, LoRALinear) for _, m in model.lm.named_modules())
    assert any(isinstance(m, LoRALinear) for _, m in trained_model.lm.named_modules())
    np.testing.assert_allclose(sbd_logits(model), sbd_logits(trained_model), atol=1e-4)
    np.testing.assert_allclose(np.array(model(TOKENS)), np.array(trained_model(TOKENS)), atol=1e-4)


def test_recorded_draft_acceptance_is_loaded(trained, tmp_path):
    """record_draft_acceptance writes the rates into the config without touching the weights (their save id still
    agrees) and the loaded model's settings carry them."""
    import shutil

    from mlx_sbd.adapter import record_draft_acceptance
    base, path, model = trained
    copy = tmp_path / "ad"
    shutil.copytree(path, copy)
    record_draft_acceptance(copy, [0.5, 0.25])
    loaded, _ = load(base)
    load_adapter(loaded, copy)
    assert loaded.sbd.draft_acceptance == [0.5, 0.25]
    np.testing.assert_array_equal(sbd_logits(loaded), sbd_logits(model))
