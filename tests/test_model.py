"""SBDModel.forward against a numpy re-derivation of the whole transformer, read straight from the checkpoint.

The reference below re-implements Llama/Qwen from the safetensors and config.json that transformers wrote
(RMSNorm, rotate-half RoPE at given positions with default/linear/llama3 frequencies, GQA attention under an
arbitrary boolean mask, SwiGLU, tied or untied head), in float64, sharing no code with mlx_lm or mlx_sbd.
"""

import json
import math

import mlx.core as mx
import numpy as np
import pytest
from conftest import LLAMA3_ROPE, assert_close_to_scale, torch_logits
from mlx_lm.models.cache import KVCache
from safetensors.numpy import load_file

from mlx_sbd.loading import load_model
from mlx_sbd.masks import training_mask
from mlx_sbd.model import MASK_ID


# --- numpy reference ------------------------------------------------------------------------------------
def np_inv_freq(config: dict, head_dim: int) -> np.ndarray:
    """[D/2] RoPE inverse frequencies, as transformers' rope init functions define them."""
    params = config.get("rope_parameters") or dict(config.get("rope_scaling") or {}, rope_theta=config["rope_theta"])
    inv = 1.0 / params["rope_theta"] ** (np.arange(0, head_dim, 2) / head_dim)
    kind = params.get("rope_type", params.get("type", "default"))
    if kind == "linear":
        return inv / params["factor"]
    if kind == "llama3":
        factor, lo, hi = params["factor"], params["low_freq_factor"], params["high_freq_factor"]
        old = params["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        scaled = np.where(wavelen > old / lo, inv / factor, inv)
        smooth = (old / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old / hi) & (wavelen <= old / lo)
        return np.where(medium, smoothed, scaled)
    assert kind == "default", kind
    return inv


def np_rms_norm(x, w, eps):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w


def np_rope(x, positions, inv_freq):
    """x: [H, T, D] rotated at absolute positions [T], transformers' rotate_half layout."""
    angles = positions[:, None] * inv_freq[None, :]  # [T, D/2]
    cos, sin = np.cos(np.concatenate([angles, angles], -1)), np.sin(np.concatenate([angles, angles], -1))
    half = x.shape[-1] // 2
    rotated = np.concatenate([-x[..., half:], x[..., :half]], -1)
    return x * cos + rotated * sin


def np_forward(folder, tokens, positions, mask, mask_embedding=None) -> np.ndarray:
    """Logits [T, vocab] of the checkpoint in `folder` for ids [T] (MASK_ID rows take `mask_embedding`),
    absolute positions [T] and boolean mask [T, T] (query, key)."""
    config = json.loads((folder / "config.json").read_text())
    w = {k: v.astype(np.float64) for k, v in load_file(str(folder / "model.safetensors")).items()}
    H, Hkv, eps = config["num_attention_heads"], config["num_key_value_heads"], config["rms_norm_eps"]
    D = config.get("head_dim") or config["hidden_size"] // H
    inv_freq = np_inv_freq(config, D)
    tokens, positions = np.asarray(tokens), np.asarray(positions, np.float64)
    T = len(tokens)

    h = w["model.embed_tokens.weight"][np.where(tokens == MASK_ID, 0, tokens)]  # [T, dim]
    if mask_embedding is not None:
        h[tokens == MASK_ID] = np.asarray(mask_embedding, np.float64)

    def linear(x, name):
        y = x @ w[name + ".weight"].T
        return y + w[name + ".bias"] if name + ".bias" in w else y

    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        x = np_rms_norm(h, w[p + "input_layernorm.weight"], eps)
        q = linear(x, p + "self_attn.q_proj").reshape(T, H, D).transpose(1, 0, 2)  # [H, T, D]
        k = linear(x, p + "self_attn.k_proj").reshape(T, Hkv, D).transpose(1, 0, 2)  # [Hkv, T, D]
        v = linear(x, p + "self_attn.v_proj").reshape(T, Hkv, D).transpose(1, 0, 2)
        if p + "self_attn.q_norm.weight" in w:  # qwen3: per-head RMSNorm before RoPE
            q = np_rms_norm(q, w[p + "self_attn.q_norm.weight"], eps)
            k = np_rms_norm(k, w[p + "self_attn.k_norm.weight"], eps)
        q, k = np_rope(q, positions, inv_freq), np_rope(k, positions, inv_freq)
        k, v = np.repeat(k, H // Hkv, axis=0), np.repeat(v, H // Hkv, axis=0)  # query head j uses kv head j // (H/Hkv)
        scores = np.where(mask[None], q @ k.transpose(0, 2, 1) / math.sqrt(D), -np.inf)  # [H, T, T]
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        out = (probs @ v).transpose(1, 0, 2).reshape(T, H * D)
        h = h + linear(out, p + "self_attn.o_proj")
        x = np_rms_norm(h, w[p + "post_attention_layernorm.weight"], eps)
        gate, up = linear(x, p + "mlp.gate_proj"), linear(x, p + "mlp.up_proj")
        h = h + linear(gate / (1 + np.exp(-gate)) * up, p + "mlp.down_proj")
    h = np_rms_norm(h, w["model.norm.weight"], eps)
    head = w.get("lm_head.weight", w["model.embed_tokens.weight"])  # tied: no lm_head in the file
    return h @ head.T


# --- helpers --------------------------------------------------------------------------------------------
def random_mask(rng, T, S=None) -> np.ndarray:
    """Random boolean [T, S] mask whose last-T diagonal (each query's own key) is always True."""
    S = S or T
    mask = rng.random((T, S)) < 0.4
    mask[np.arange(T), S - T + np.arange(T)] = True
    return mask


def sbd_logits(model, tokens, positions=None, mask="causal", cache=None) -> np.ndarray:
    """SBDModel.forward on one sequence: [T] ids -> [T, vocab] numpy."""
    pos = None if positions is None else mx.array(np.asarray(positions, np.int32))
    if isinstance(mask, np.ndarray):
        mask = mx.array(mask)
    return np.array(model.forward(mx.array(np.asarray(tokens)[None]), pos, mask, cache)[0])


# The three families the numpy reference covers: plain Llama (llama3 RoPE), Qwen2 (qkv bias), Qwen3 (q/k norm).
VARIANTS = {
    "llama-llama3-untied": dict(family="llama", rope=LLAMA3_ROPE, tie=False),
    "qwen2-tied": dict(family="qwen2", tie=True),
    "qwen3-untied": dict(family="qwen3", tie=False),
}


@pytest.fixture(params=list(VARIANTS))
def variant(request, tiny_model):
    """(folder, SBDModel) of one tiny checkpoint per VARIANTS entry."""
    folder, _ = tiny_model(**VARIANTS[request.param])
    return folder, load_model(folder)


# --- tests ----------------------------------------------------------------------------------------------
def test_explicit_positions_and_mask_match_numpy(variant):
    folder, model = variant
    rng = np.random.default_rng(1)
    T = 48
    tokens = rng.integers(0, 128, T)
    positions = rng.integers(0, 400, T)  # repeats and far-apart positions, so every RoPE band matters
    mask = random_mask(rng, T)
    expected = np_forward(folder, tokens, positions, mask)
    assert_close_to_scale(sbd_logits(model, tokens, positions, mask), expected)


def test_default_forward_is_causal_at_0_to_T(variant):
    folder, model = variant
    tokens = np.random.default_rng(2).integers(0, 128, 40)
    expected = np_forward(folder, tokens, np.arange(40), np.tril(np.ones((40, 40), bool)))
    assert_close_to_scale(sbd_logits(model, tokens), expected)


def test_forward_after_prefilled_kv_cache_matches_numpy(variant):
    """mlx_lm KVCache prefilled by mlx_lm's causal forward; new tokens use a mask over cache + new keys.

    Reference: one full numpy forward over prefix + new, where prefix rows are causal over the prefix (so
    their keys/values are the cached ones) and new rows use the given mask."""
    folder, model = variant
    rng = np.random.default_rng(3)
    P, T = 30, 12
    prefix, new = rng.integers(0, 128, P), rng.integers(0, 128, T)
    new[[2, 5]] = MASK_ID
    new_positions = P + rng.integers(0, 2 * T, T)
    new_mask = random_mask(rng, T, P + T)  # [T, P + T]

    cache = model.make_cache()  # one mlx_lm KVCache per layer
    mx.eval(model(mx.array(prefix[None]), cache=cache))
    actual = sbd_logits(model, new, new_positions, new_mask, cache)
    assert cache[0].offset == P + T

    full_mask = np.zeros((P + T, P + T), bool)
    full_mask[:P, :P] = np.tril(np.ones((P, P), bool))
    full_mask[P:] = new_mask
    expected = np_forward(
        folder, np.concatenate([prefix, new]), np.concatenate([np.arange(P), new_positions]), full_mask,
        mask_embedding=np.array(model.mask_embedding),
    )[P:]
    assert_close_to_scale(actual, expected)


def test_batched_forward_takes_per_row_positions_and_masks(variant):
    folder, model = variant
    rng = np.random.default_rng(4)
    T = 20
    tokens = rng.integers(0, 128, (2, T))
    positions = rng.integers(0, 300, (2, T))
    masks = np.stack([random_mask(rng, T), random_mask(rng, T)])  # [B, T, T]
    out = model.forward(mx.array(tokens), mx.array(positions.astype(np.int32)), mx.array(masks[:, None]))
    for b in range(2):
        assert_close_to_scale(np.array(out[b]), np_forward(folder, tokens[b], positions[b], masks[b]))


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3"])
def test_make_cache_gives_one_kv_cache_per_layer(tiny_model, family):
    # mlx_lm's qwen2/qwen3 models have no make_cache of their own.
    model = load_model(tiny_model(family)[0])
    cache = model.make_cache()
    assert len(cache) == len(model.layers) and all(isinstance(c, KVCache) for c in cache)


@pytest.mark.parametrize("with_cache", [False, True])
def test_token_order_does_not_matter_given_positions_and_mask(tiny_model, with_cache):
    folder, _ = tiny_model("llama", rope=LLAMA3_ROPE)
    model = load_model(folder)
    rng = np.random.default_rng(5)
    P, T = (16 if with_cache else 0), 24
    tokens, positions = rng.integers(0, 128, T), P + rng.permutation(T)
    tokens[[0, 7]] = MASK_ID
    mask = random_mask(rng, T, P + T)
    perm = rng.permutation(T)
    perm_mask = np.concatenate([mask[perm][:, :P], mask[perm][:, P:][:, perm]], axis=1)

    def run(t, p, m):
        cache = None
        if with_cache:
            cache = model.make_cache()
            mx.eval(model(mx.array(np.arange(P)[None] % 128), cache=cache))
        return sbd_logits(model, t, p, m, cache)

    assert_close_to_scale(run(tokens[perm], positions[perm], perm_mask), run(tokens, positions, mask)[perm], 1e-5)


def test_mask_token_uses_mask_embedding_and_never_a_vocab_row(variant):
    folder, model = variant
    embed = load_file(str(folder / "model.safetensors"))["model.embed_tokens.weight"]
    # Starts at the mean token embedding (a neutral input), independent of any vocabulary row.
    np.testing.assert_allclose(np.array(model.mask_embedding), embed.mean(0), atol=1e-6)

    rng = np.random.default_rng(6)
    model.mask_embedding = mx.array(rng.normal(0, 0.5, embed.shape[1]).astype(np.float32))
    T = 16
    tokens, positions = rng.integers(0, 128, T), rng.integers(0, 64, T)
    tokens[[1, 4, 5, 15]] = MASK_ID
    mask = random_mask(rng, T)
    actual = sbd_logits(model, tokens, positions, mask)
    assert actual.shape == (T, 128)  # vocab_size: no extra row for the mask token
    expected = np_forward(folder, tokens, positions, mask, mask_embedding=np.array(model.mask_embedding))
    assert_close_to_scale(actual, expected)


def test_training_forward_clean_half_is_causal_lm_and_noised_half_matches_numpy(tiny_model):
    """The doubled SBD training input: clean half equals transformers' causal LM, noised half equals numpy."""
    folder, torch_model = tiny_model("qwen3", tie=True)
    model = load_model(folder)
    rng = np.random.default_rng(7)
    L, k = 24, 4
    clean = rng.integers(0, 128, L)
    noised = np.where(rng.random(L) < 0.5, MASK_ID, clean)
    tokens, positions = np.concatenate([clean, noised]), np.concatenate([np.arange(L), np.arange(L)])
    mask = training_mask(L, k)
    actual = sbd_logits(model, tokens, positions, np.array(mask))
    assert_close_to_scale(actual[:L], torch_logits(torch_model, clean))
    expected = np_forward(folder, tokens, positions, np.array(mask), mask_embedding=np.array(model.mask_embedding))
    assert_close_to_scale(actual[L:], expected[L:])


def test_grad_checkpoint_gives_the_same_loss_and_gradients(variant):
    """Recomputing each block in the backward pass (--grad-checkpoint) must not change what is learned."""
    from mlx.utils import tree_flatten
    from mlx_lm.tuner.utils import linear_to_lora_layers

    folder, _ = variant
    model = load_model(folder)
    model.freeze()
    linear_to_lora_layers(model.lm, 2, {"rank": 4, "scale": 10.0, "dropout": 0.0})
    model.lm.apply_to_modules(lambda k, m: m.__setattr__("lora_b", mx.random.normal(m.lora_b.shape) * 0.1)
                              if hasattr(m, "lora_b") else None)
    L = 12
    tokens = mx.array(np.random.default_rng(0).integers(0, 100, (2, 2 * L)))
    tokens = mx.where(mx.arange(2 * L) % 3 == 0, MASK_ID, tokens) * (mx.arange(2 * L) >= L) + tokens * (mx.arange(2 * L) < L)
    positions = mx.concatenate([mx.arange(L), mx.arange(L)])
    mask = training_mask(L, 4)

    def loss(params):
        model.update(params)
        return (model.forward(tokens, positions, mask) ** 2).mean()

    results = []
    for checkpoint in (False, True):
        model.grad_checkpoint = checkpoint
        value, grads = mx.value_and_grad(loss)(model.trainable_parameters())
        results.append((value.item(), tree_flatten(grads)))
    (v0, g0), (v1, g1) = results
    assert abs(v0 - v1) <= 1e-5 * abs(v0) and len(g0) == len(g1) > 0
    for (name, a), (_, b) in zip(g0, g1):
        assert np.abs(np.array(a) - np.array(b)).max() <= 1e-4 * (np.abs(np.array(a)).max() + 1e-6), name
