"""Shared fixtures: tiny random Llama/Mistral/Qwen checkpoints written by transformers itself.

`tiny_model(family, ...)` builds a transformers *ForCausalLM with random weights, saves it with
`save_pretrained` (transformers 5 writes RoPE settings under `rope_parameters`) or rewrites config.json into
the classic `rope_theta` / `rope_scaling` form, and returns (folder, torch_model). The torch model is the
independent reference the tests compare mlx-sbd against.
"""

import json
from pathlib import Path

import numpy as np
import pytest

# Small enough to be fast, large enough for GQA (4 query heads, 2 KV heads) and 4-bit quantisation
# (every input dimension a multiple of the group size 64). initializer_range 0.2 so logits are not tiny.
TINY = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    initializer_range=0.2,
    rms_norm_eps=1e-5,
    max_position_embeddings=4096,
)

# Llama 3 scaling with a small original context so positions of a 300-token sequence reach every band.
LLAMA3_ROPE = dict(
    rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=32
)
LINEAR_ROPE = dict(rope_type="linear", factor=4.0)

# rope_theta differs from mlx_lm's per-family default, so a loader that drops it gives different logits.
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", 50000.0),
    "mistral": ("MistralConfig", "MistralForCausalLM", 50000.0),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", 10000.0),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", 10000.0),
}


def build_tiny(folder: Path, family: str, tie: bool = False, rope=None, classic: bool = False, seed: int = 0, **cfg):
    """Random tiny `family` model saved in `folder`; returns (folder, torch_model in float32, eval mode)."""
    import torch
    import transformers

    config_name, model_name, theta = FAMILIES[family]
    extra = dict(sliding_window=None) if family == "mistral" else {}
    params = dict(rope_type="default", rope_theta=theta) if rope is None else dict(rope, rope_theta=theta)
    config = getattr(transformers, config_name)(
        **{**TINY, **extra, **cfg}, tie_word_embeddings=tie, rope_parameters=params
    )
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(config).float().eval()
    model.save_pretrained(folder)
    if classic:
        to_classic_config(folder / "config.json")
    return folder, model


def to_classic_config(path: Path) -> None:
    """Rewrite a transformers-5 config.json into the transformers-4 form (`rope_theta`, `rope_scaling`)."""
    config = json.loads(path.read_text())
    params = dict(config.pop("rope_parameters"))
    config["rope_theta"] = params.pop("rope_theta")
    config["rope_scaling"] = None if params.get("rope_type", "default") == "default" else params
    path.write_text(json.dumps(config, indent=2))


@pytest.fixture
def tiny_model(tmp_path):
    """Factory: tiny_model(family, tie=False, rope=None, classic=False, **config) -> (folder, torch_model)."""
    count = iter(range(1000))

    def make(family: str, **kwargs):
        return build_tiny(tmp_path / f"{family}-{next(count)}", family, **kwargs)

    return make


def torch_logits(model, tokens: np.ndarray) -> np.ndarray:
    """transformers' causal forward: [T] ids -> [T, vocab] float32 logits."""
    import torch

    with torch.no_grad():
        return model(torch.as_tensor(tokens[None], dtype=torch.long)).logits[0].float().numpy()


def assert_close_to_scale(actual, expected, rel: float = 1e-4):
    """max |actual - expected| <= rel * max |expected| (a tolerance relative to the logit scale)."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert actual.shape == expected.shape
    err, scale = np.abs(actual - expected).max(), np.abs(expected).max()
    assert err <= rel * scale, f"max abs diff {err:.3g} > {rel} * logit scale {scale:.3g}"


# A tiny llama with a char tokenizer and a small `reverse` dataset: what the training tests train on.
TRAIN_TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=128)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(base model folder, data folder) for training tests."""
    from mlx_sbd.tasks import alphabet, write_dataset
    from mlx_sbd.tiny import make_tiny_model

    root = tmp_path_factory.mktemp("train")
    base = make_tiny_model(root / "base", alphabet=alphabet("reverse"), **TRAIN_TINY)
    data = write_dataset(root / "data", "reverse", 24, 4, 4, seed=0, min_len=3, max_len=8)
    return base, data


@pytest.fixture(autouse=True, scope="session")
def _measurement_cache(tmp_path_factory):
    """Measured time(rows) (costs.py) goes to a per-run folder, not the user's ~/.cache."""
    import os

    os.environ.setdefault("MLX_SBD_CACHE", str(tmp_path_factory.mktemp("mlx_sbd_cache")))
