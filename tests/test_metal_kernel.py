"""The decode-step attention (mlx_sbd.metal_kernel, mlx_sbd.attention.block_attention) against a numpy reference.

On Linux the Metal kernel's own source runs in a g++ emulator (tests/metal_emulator) with the wrapper's launch
geometry and split merge; the reference path (SDPA + inference_mask) runs in MLX. On a Mac the real kernel is
compared too, and a tiny random llama must decode the same tokens with and without it.
"""

import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from mlx_sbd import metal_kernel as mk
from mlx_sbd.attention import BlockMask, block_attention

sys.path.insert(0, str(Path(__file__).parent))
from metal_emulator import emulate  # noqa: E402

needs_metal = pytest.mark.skipif(not mx.metal.is_available(), reason="needs Metal (Apple silicon)")

# (B, Hq, Hkv, T, offset, causal_point, D, dtype, splits, spare): the key length is offset + T; `spare` extra
# cache rows lie beyond it (a KVCache-style view); splits is the number of key splits the emulator runs.
CASES = [
    (1, 4, 4, 8, 0, 0, 64, "float32", 1, 5),  # empty cache, pure block, GQA 1
    (1, 4, 4, 8, 0, 8, 64, "float32", 1, 0),  # empty cache, pure causal
    (2, 6, 2, 5, 37, 2, 64, "float32", 1, 11),  # GQA 3, odd lengths, batch 2
    (1, 8, 2, 8, 60, 4, 128, "float32", 3, 3),  # GQA 4, 3 splits of 32 keys; rows 0-3 see none of split 2
    (1, 8, 1, 16, 200, 16, 128, "float32", 2, 40),  # GQA 8, pure causal, 128 rows = 4 row tiles
    (1, 8, 1, 4, 61, 0, 64, "float32", 4, 9),  # pure block over a cache; split 3 is empty (65 keys)
    (1, 2, 2, 64, 33, 32, 64, "float32", 2, 7),  # the longest q_len
    (1, 4, 1, 12, 51, 6, 128, "float16", 1, 13),
    (2, 3, 1, 7, 90, 3, 64, "float16", 3, 2),
]
TOL = {"float32": 1e-5, "float16": 2e-3}


def reference(q, k, v, scale, offset, causal_point):
    """numpy float64: q [B, Hq, T, D], k/v [B, Hkv, S, D]; new query t sees key j iff j <= offset+t or t >= cp."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    group = q.shape[1] // k.shape[1]
    k, v = np.repeat(k, group, axis=1), np.repeat(v, group, axis=1)
    T, S = q.shape[2], k.shape[2]
    t, j = np.arange(T)[:, None], np.arange(S)[None, :]
    allowed = (j <= offset + t) | (t >= causal_point)
    s = np.where(allowed, scale * q @ k.swapaxes(-1, -2), -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    return (p / p.sum(-1, keepdims=True)) @ v


def make_case(case, seed=0):
    """Numpy buffers and strided views like the decode loop's: q [B, Hq, T, D] transposed from [B, T, Hq, D],
    k/v [B, Hkv, S, D] sliced from caches of capacity S + spare. Half-precision values are rounded."""
    B, Hq, Hkv, T, offset, cp, D, dtype, splits, spare = case
    rng = np.random.default_rng(seed)
    S = offset + T
    rnd = (lambda a: a.astype(np.float16).astype(np.float32)) if dtype == "float16" else (lambda a: a)
    q_base = rnd(rng.standard_normal((B, T, Hq, D), dtype=np.float32))
    k_cache = rnd(rng.standard_normal((B, Hkv, S + spare, D), dtype=np.float32))
    v_cache = rnd(rng.standard_normal((B, Hkv, S + spare, D), dtype=np.float32))
    views = (q_base.transpose(0, 2, 1, 3), k_cache[:, :, :S], v_cache[:, :, :S])
    return (q_base, k_cache, v_cache), views, D**-0.5


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
    """{(dtype, D): executable} of the kernel source inside MLX's generated signature, one per template set."""
    kernels = {}
    for case in CASES:
        dtype, D = case[7], case[6]
        name = f"custom_kernel_{mk.NAME}_{dtype}_{D}"
        template = mk.launch((1, 1, 1, D), (1, 1, 1, D), 1)["template"]
        args = (name, mk.kernel_source(), mk.INPUT_NAMES, emulated_inputs(case)[0], mk.OUTPUT_NAMES,
                ["float32", "float32"], template)  # fmt: skip
        kernels.setdefault((dtype, D), args)
    return emulate.build(tmp_path_factory.mktemp("metal_emulator"), kernels)


def emulated_inputs(case):
    """The kernel's inputs for the emulator, and the numpy views they stand for."""
    B, Hq, Hkv, T, offset, cp, D, dtype, splits, spare = case
    (q_base, k_cache, v_cache), (q, k, v), scale = make_case(case)
    inputs = [
        emulate.Input.view(dtype, q_base, q),
        emulate.Input.view(dtype, k_cache, k),
        emulate.Input.view(dtype, v_cache, v),
        emulate.Input("int32", offset),
        emulate.Input("int32", cp),
        emulate.Input("float32", scale),
    ]
    return inputs, (q, k, v), scale


def run_emulated(emulator, case):
    B, Hq, Hkv, T, offset, cp, D, dtype, splits, spare = case
    inputs, (q, k, v), scale = emulated_inputs(case)
    cfg = mk.launch(q.shape, k.shape, splits)
    sizes = [int(np.prod(s)) for s in cfg["output_shapes"]]
    out, lse = emulate.run(emulator[(dtype, D)], inputs, sizes, cfg["grid"], cfg["threadgroup"])
    out, lse = (mx.array(a.reshape(s)) for a, s in zip((out, lse), cfg["output_shapes"]))
    got = np.array(mk.merge_splits(out, lse, mx.float32))
    return got, reference(q, k, v, scale, offset, cp)


CASE_IDS = [f"T{c[3]}-off{c[4]}-cp{c[5]}-G{c[1] // c[2]}-D{c[6]}-{c[7]}-split{c[8]}" for c in CASES]


@pytest.mark.slow  # ~17 s of CPU, mostly g++ building the four template sets
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_emulated_kernel_matches_numpy(emulator, case):
    got, want = run_emulated(emulator, case)
    err = np.abs(got - want).max()
    assert err <= TOL[case[7]], f"max abs diff {err:.3g}"


def test_emulator_signature_is_mlx_layout():
    """The emulated signature follows MLX's rules: 0-d scalars by constant reference, strides as int64."""
    q = emulate.Input("float16", None, (1, 2, 3, 64), (384, 192, 64, 1))
    s = emulate.Input("int32", 0)
    src = "x = q_strides[0] + q_shape[1]; uint i = thread_index_in_simdgroup; uint3 g = threadgroup_position_in_grid;"
    text = emulate.kernel_function("f", src, ["q", "n"], [q, s], ["out"], ["float32"], [("D", 64)])
    assert text.startswith("template <int D>\n[[kernel]] void f(\n")
    assert "  const device float16_t* q [[buffer(0)]],\n  const constant int* q_shape [[buffer(1)]]," in text
    assert "  const constant int64_t* q_strides [[buffer(2)]],\n  const constant int32_t& n [[buffer(3)]]," in text
    assert "  device float* out [[buffer(4)]],\n  uint thread_index_in_simdgroup [[thread_index_in_simdgroup]]," in text
    assert "  uint3 threadgroup_position_in_grid [[threadgroup_position_in_grid]]) {\n" in text


def to_mx(case, dtype=None):
    """The same strided views as MLX arrays: slices of cache arrays and a transposed q, as in the decode loop."""
    (q_base, k_cache, v_cache), (q, k, v), scale = make_case(case)
    dt = getattr(mx, dtype or case[7])
    S = k.shape[2]
    mq = mx.array(q_base).astype(dt).transpose(0, 2, 1, 3)
    mk_, mv = (mx.array(c).astype(dt)[:, :, :S] for c in (k_cache, v_cache))
    return (mq, mk_, mv), (q, k, v), scale


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_reference_path_matches_numpy(case):
    B, Hq, Hkv, T, offset, cp, D, dtype, splits, spare = case
    (mq, mk_, mv), (q, k, v), scale = to_mx(case, "float32")
    got = np.array(block_attention(mq, mk_, mv, scale, offset, cp))
    assert np.abs(got - reference(q, k, v, scale, offset, cp)).max() <= 1e-5


def test_supported_shapes():
    q = mx.zeros((1, 8, 4, 128), mx.float16)
    kv = mx.zeros((1, 2, 20, 128), mx.float16)
    assert mk.supported(q, kv, kv, 16)
    assert not mk.supported(q, kv, kv, 15)  # key length must be offset + q_len
    assert not mk.supported(mx.zeros((1, 8, 4, 96), mx.float16), mx.zeros((1, 2, 20, 96), mx.float16), kv, 16)
    assert not mk.supported(mx.zeros((1, 8, 65, 128), mx.float16), mx.zeros((1, 2, 81, 128), mx.float16),
                            mx.zeros((1, 2, 81, 128), mx.float16), 16)  # fmt: skip
    assert not mk.supported(q, kv.astype(mx.float32), kv, 16)
    assert not mk.supported(mx.zeros((1, 6, 4, 128), mx.float16), mx.zeros((1, 4, 20, 128), mx.float16),
                            mx.zeros((1, 4, 20, 128), mx.float16), 16)  # fmt: skip


@pytest.mark.skipif(mx.metal.is_available(), reason="Linux behaviour")
def test_no_metal_means_reference_path():
    (mq, mk_, mv), _, scale = to_mx(CASES[3])
    assert mk.metal_block_attention(mq, mk_, mv, scale, 60, 4) is None


# --- on a Mac --------------------------------------------------------------------------------------------
METAL_TOL = {"float32": 1e-5, "float16": 4e-3, "bfloat16": 3e-2}


@needs_metal
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_metal_kernel_matches_reference(case, dtype):
    offset, cp = case[4], case[5]
    (mq, mk_, mv), (q, k, v), scale = to_mx(case, dtype)
    got = mk.metal_block_attention(mq, mk_, mv, scale, offset, cp)
    assert got is not None and got.dtype == mq.dtype
    want = reference(*(np.array(a.astype(mx.float32)) for a in (mq, mk_, mv)), scale, offset, cp)
    assert np.abs(np.array(got.astype(mx.float32)) - want).max() <= METAL_TOL[dtype]


@needs_metal
def test_metal_kernel_long_cache_splits():
    case = (1, 32, 8, 16, 5000, 8, 128, "float16", 1, 100)
    (mq, mk_, mv), (q, k, v), scale = to_mx(case)
    got = mk.metal_block_attention(mq, mk_, mv, scale, 5000, 8)
    want = reference(*(np.array(a.astype(mx.float32)) for a in (mq, mk_, mv)), scale, 5000, 8)
    assert np.abs(np.array(got.astype(mx.float32)) - want).max() <= METAL_TOL["float16"]


def greedy_block_decode(use_kernel: bool, monkeypatch, k: int = 4, blocks: int = 4):
    """A tiny random llama (head dim 64) decoding SBD-style over an mlx_lm KVCache; returns all tokens."""
    from mlx.utils import tree_map
    from mlx_lm.models.cache import make_prompt_cache
    from mlx_lm.models.llama import Model, ModelArgs

    import mlx_sbd.attention as attention
    from mlx_sbd.model import MASK_ID, SBDModel

    if not use_kernel:
        monkeypatch.setattr(attention, "metal_block_attention", lambda *a: None)
    mx.random.seed(0)
    args = ModelArgs(model_type="llama", hidden_size=256, num_hidden_layers=2, intermediate_size=512,
                     num_attention_heads=8, num_key_value_heads=2, rms_norm_eps=1e-5, vocab_size=97,
                     head_dim=64, tie_word_embeddings=False)  # fmt: skip
    lm = Model(args)
    lm.update(tree_map(lambda p: 3 * p if p.ndim == 2 else p, lm.parameters()))  # peaked attention, varied tokens
    model = SBDModel(lm)
    cache = make_prompt_cache(model.lm)
    prompt = mx.array([[5, 17, 3, 88, 41, 9, 60]])
    logits = model.forward(prompt, mask="causal", cache=cache)
    out, prev = [], [int(mx.argmax(logits[0, -1]).item())]
    for _ in range(blocks):
        tokens = mx.array([prev + [MASK_ID] * k])
        logits = model.forward(tokens, mask=BlockMask(causal_point=len(prev)), cache=cache)
        for c in cache:  # keep only the finalized tokens' K/V
            c.trim(k)
        prev = [int(t) for t in mx.argmax(logits[0, len(prev) :], axis=-1).tolist()]
        out += prev
    return out


@needs_metal
def test_decode_tokens_identical_with_kernel(monkeypatch):
    with_kernel = greedy_block_decode(True, monkeypatch)
    monkeypatch.undo()
    reference_tokens = greedy_block_decode(False, monkeypatch)
    assert len(set(reference_tokens)) > 4  # the tiny model does not collapse to one token
    assert with_kernel == reference_tokens

