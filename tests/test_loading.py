"""loading.load / load_model against transformers (both config styles), mlx_lm (4-bit folders), and bad input."""

import json

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from conftest import LINEAR_ROPE, LLAMA3_ROPE, assert_close_to_scale, torch_logits
from mlx_lm.utils import dequantize_model, quantize_model, save_config, save_model
from mlx_lm.utils import load_model as mlx_lm_load_model

from mlx_sbd.errors import SBDError
from mlx_sbd.loading import check_config, load, load_model
from mlx_sbd.model import MASK_ID, SBDModel

# 300 tokens with original_max_position_embeddings=32 puts positions far past every llama3 band edge.
TOKENS = np.random.default_rng(0).integers(0, 128, 300)

CASES = {
    "llama": dict(family="llama"),
    "llama-llama3": dict(family="llama", rope=LLAMA3_ROPE),
    "llama-linear": dict(family="llama", rope=LINEAR_ROPE),
    "mistral": dict(family="mistral"),
    "qwen2": dict(family="qwen2"),
    "qwen3": dict(family="qwen3"),
}


def logits_of(model, tokens=TOKENS) -> np.ndarray:
    return np.array(model(mx.array(tokens[None]))[0])


@pytest.mark.parametrize("classic", [False, True], ids=["rope_parameters", "rope_theta+rope_scaling"])
@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("case", list(CASES))
def test_loads_like_transformers(tiny_model, case, tie, classic):
    folder, torch_model = tiny_model(**CASES[case], tie=tie, classic=classic)
    model = load_model(folder)
    expected = torch_logits(torch_model, TOKENS)
    assert_close_to_scale(logits_of(model), expected)  # mlx_lm's own causal forward
    assert_close_to_scale(np.array(model.forward(mx.array(TOKENS[None]))[0]), expected)  # the SBD forward
    assert model.forward(mx.array(TOKENS[None, :4])).shape == (1, 4, 128)


@pytest.mark.parametrize("case", ["llama-llama3", "qwen2"])
def test_check_config_gives_mlx_lm_the_rope_settings_of_rope_parameters(tiny_model, case):
    """transformers 5 writes the RoPE settings only under `rope_parameters`, which mlx_lm 0.32 ignores for llama and
    qwen2 (it would run its default rope_theta and no scaling). check_config turns them into the classic overrides;
    given those, mlx_lm's own model computes transformers' logits, whether or not mlx_lm reads rope_parameters."""
    folder, torch_model = tiny_model(**CASES[case])
    config = json.loads((folder / "config.json").read_text())
    assert "rope_theta" not in config and "rope_scaling" not in config  # the transformers-5 layout in question
    params = config["rope_parameters"]
    overrides = check_config(config, folder)
    assert overrides["rope_theta"] == params["rope_theta"]  # llama's 50000 is not mlx_lm's default 10000
    assert overrides["rope_scaling"] == (None if params["rope_type"] == "default" else params)
    lm, _ = mlx_lm_load_model(folder, model_config=overrides)
    assert_close_to_scale(logits_of(lm), torch_logits(torch_model, TOKENS))


def quantize_folder(src, dst, bits=4):
    """mlx_lm's own 4-bit conversion of `src` (affine, group size 64), saved like `mlx_lm.convert` saves it."""
    lm, config = mlx_lm_load_model(src)
    lm, config = quantize_model(lm, config, group_size=64, bits=bits)
    save_model(dst, lm)
    save_config(config, dst / "config.json")
    return dst


def test_mlx_4bit_folder_loads_and_runs_the_sbd_forward(tiny_model, tmp_path):
    # initializer_range 0.05: at 0.2 random weights amplify 4-bit error too much for "close" to mean anything.
    folder, torch_model = tiny_model("llama", rope=LLAMA3_ROPE, classic=True, initializer_range=0.05)
    qfolder = quantize_folder(folder, tmp_path / "q4")
    model = load_model(qfolder)
    assert isinstance(model.lm.layers[0].self_attn.q_proj, nn.QuantizedLinear)
    reference, _ = mlx_lm_load_model(qfolder)
    expected = logits_of(reference)
    assert_close_to_scale(logits_of(model), expected, 1e-6)
    assert_close_to_scale(np.array(model.forward(mx.array(TOKENS[None]))[0]), expected, 1e-5)

    # Close to the unquantized model: an unrelated random model is ~1.4 away on this measure.
    full = torch_logits(torch_model, TOKENS)
    q = logits_of(model)
    assert np.abs(q - full).mean() / np.abs(full).mean() < 0.35
    assert np.corrcoef(q.ravel(), full.ravel())[0, 1] > 0.95

    # Quantized layers through the explicit-position, masked forward: same as the dequantized weights.
    dense = SBDModel(dequantize_model(reference), model.mask_embedding)
    rng = np.random.default_rng(1)
    tokens, positions = rng.integers(0, 128, (1, 32)), mx.array(rng.integers(0, 300, 32).astype(np.int32))
    tokens[0, [3, 9]] = MASK_ID
    mask = rng.random((32, 32)) < 0.5
    mask[np.arange(32), np.arange(32)] = True
    args = (mx.array(tokens), positions, mx.array(mask))
    assert_close_to_scale(np.array(model.forward(*args)), np.array(dense.forward(*args)))


def test_fused_folder_brings_its_mask_embedding(tiny_model):
    folder, _ = tiny_model("qwen3")
    trained = np.random.default_rng(2).normal(size=64).astype(np.float32)
    mx.save_safetensors(str(folder / "sbd.safetensors"), {"mask_embedding": mx.array(trained)})
    np.testing.assert_array_equal(np.array(load_model(folder).mask_embedding), trained)


# --- bad input: one SBDError line each ------------------------------------------------------------------
def sbd_error(ref) -> str:
    with pytest.raises(SBDError) as info:
        load(ref)
    message = str(info.value)
    assert message and "\n" not in message
    return message


@pytest.fixture
def good_folder(tiny_model):
    return tiny_model("llama")[0]


def edit_config(folder, **changes):
    path = folder / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def test_missing_path(tmp_path):
    assert "not found" in sbd_error(tmp_path / "no-such-model")
    assert "not found" in sbd_error("./no-such-model")


def test_folder_without_config_json(good_folder):
    (good_folder / "config.json").unlink()
    assert "config.json" in sbd_error(good_folder)


def test_config_json_not_json(good_folder):
    (good_folder / "config.json").write_text("{model_type: llama")
    assert "not valid JSON" in sbd_error(good_folder)


def test_folder_without_tokenizer(good_folder):
    assert not list(good_folder.glob("tokenizer*"))  # transformers saved the model alone
    message = sbd_error(good_folder)
    assert "has no tokenizer" in message and str(good_folder) in message


def test_broken_tokenizer_json(good_folder):
    (good_folder / "tokenizer.json").write_text('{"version": "1.0", "model": ')
    message = sbd_error(good_folder)
    assert "could not load the tokenizer" in message and str(good_folder) in message


def test_folder_without_weights(good_folder):
    (good_folder / "model.safetensors").unlink()
    assert "safetensors" in sbd_error(good_folder)


def test_unsupported_model_type_lists_supported_families(good_folder):
    edit_config(good_folder, model_type="gpt2")
    message = sbd_error(good_folder)
    assert "gpt2" in message
    assert all(family in message for family in ("llama", "mistral", "qwen2", "qwen3"))


def test_truncated_safetensors(good_folder):
    weights = good_folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    message = sbd_error(good_folder)
    assert "truncated" in message and "model.safetensors" in message


@pytest.mark.parametrize(
    "header",
    [
        (20).to_bytes(8, "little") + b"{not json at all...}",
        (10**12).to_bytes(8, "little") + b"{}",  # header length beyond the end of the file
        b"\x01\x02",  # not even a length
    ],
    ids=["bad-json", "huge-length", "short"],
)
def test_corrupt_safetensors_header(good_folder, header):
    weights = good_folder / "model.safetensors"
    weights.write_bytes(header)
    message = sbd_error(good_folder)
    assert "model.safetensors" in message and "corrupt" in message


@pytest.mark.parametrize(
    "changes",
    [
        dict(rope_parameters=dict(rope_type="yarn", factor=4.0, rope_theta=10000.0)),
        dict(rope_parameters=None, rope_theta=10000.0, rope_scaling=dict(type="dynamic", factor=2.0)),
    ],
    ids=["rope_parameters-yarn", "rope_scaling-dynamic"],
)
def test_unsupported_rope_type(good_folder, changes):
    edit_config(good_folder, **changes)
    message = sbd_error(good_folder)
    kind = "yarn" if "yarn" in str(changes) else "dynamic"
    assert kind in message and "llama3" in message


def test_repo_id_while_offline(monkeypatch, tmp_path):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads HF_HUB_OFFLINE at import, and transformers has imported it already.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    message = sbd_error("nobody-xyz/none")
    assert "nobody-xyz/none" in message
