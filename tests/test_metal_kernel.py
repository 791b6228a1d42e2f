"""Span-masked attention (mlx_sbd.metal_kernel, mlx_sbd.attention) against a numpy reference.

Layouts: the decode step (BlockMask: offset, causal_point), pre-drafting's blocks at shared positions
(masks.predraft_spans) and random spans. On Linux the Metal kernel's own source runs in a g++ emulator
(tests/metal_emulator) with the wrapper's launch geometry and split merge; the reference path (SDPA + the dense
mask) runs in MLX. On a Mac the real kernel is compared too, and a tiny random llama must decode the same tokens
with and without it.
"""

import sys
from pathlib import Path
from typing import NamedTuple

import mlx.core as mx
import numpy as np
import pytest

from mlx_sbd import metal_kernel as mk
from mlx_sbd.attention import BlockMask, attention, block_attention, make_span_mask
from mlx_sbd.masks import inference_mask, predraft_spans, span_mask

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
# (B, Hq, Hkv, offset, pending, m, k, D, dtype, splits, spare): pre-drafting's T = pending + m + (m + 1) * k rows
# over `offset` cached keys (S = offset + T).
PREDRAFT_CASES = [
    (1, 4, 4, 0, 1, 0, 2, 64, "float32", 1, 3),  # T 3, one block; span arrays under 8 entries are `constant`
    (1, 4, 2, 0, 3, 4, 8, 128, "float32", 2, 5),  # T 47, splits of 32: rows before block 3 see none of split 1
    (2, 6, 2, 37, 2, 2, 4, 64, "float32", 3, 11),  # GQA 3, batch 2; split 2 is empty (53 keys)
    (1, 8, 2, 37, 1, 3, 3, 128, "float16", 2, 4),  # GQA 4
    (1, 4, 1, 1500, 3, 1, 8, 64, "float32", 2, 0),  # two splits of 768 keys, GQA 4
    (1, 2, 1, 1500, 2, 4, 5, 128, "float16", 2, 7),  # T 31: five blocks
]
# (B, Hq, Hkv, T, S, D, dtype, splits, seed): random visible/lo/hi anywhere (spans before, inside or past the
# prefix, past the keys), each row seeing at least one key.
RANDOM_CASES = [(1, 4, 2, 9, 100, 64, "float32", 3, 0), (1, 4, 1, 20, 70, 128, "float16", 2, 1)]
TOL = {"float32": 1e-5, "float16": 2e-3}


class Layout(NamedTuple):
    """One emulated case: shapes, the kernel's span inputs (numpy int32 [T]) and the reference mask [T, S]."""

    B: int
    Hq: int
    Hkv: int
    T: int
    S: int
    D: int
    dtype: str
    splits: int
    spare: int
    visible: np.ndarray
    lo: np.ndarray
    hi: np.ndarray
    allowed: np.ndarray


def block_allowed(T, offset, causal_point):
    """The decode step's rule (SBD_METHOD.md section 3): new query t sees key j iff j <= offset + t or t >= cp."""
    t, j = np.arange(T)[:, None], np.arange(offset + T)[None, :]
    return (j <= offset + t) | (t >= causal_point)


def block_layout(case):
    """The spans metal_block_attention launches, checked against the rule itself."""
    B, Hq, Hkv, T, offset, cp, D, dtype, splits, spare = case
    spans = [np.array(a) for a in mk.block_spans(T, offset, cp)]
    return Layout(B, Hq, Hkv, T, offset + T, D, dtype, splits, spare, *spans, block_allowed(T, offset, cp))


def predraft_layout(case):
    B, Hq, Hkv, offset, pending, m, k, D, dtype, splits, spare = case
    _, *spans = predraft_spans(offset, pending, m, k)
    T, S = spans[0].size, offset + spans[0].size
    allowed = np.array(span_mask(*spans, S))  # = the layout's definition (test_predraft_spans_match_definition)
    return Layout(B, Hq, Hkv, T, S, D, dtype, splits, spare, *(np.array(a) for a in spans), allowed)


def random_layout(case):
    B, Hq, Hkv, T, S, D, dtype, splits, seed = case
    rng = np.random.default_rng(seed)
    visible = rng.integers(0, S + 2, T) * rng.integers(0, 2, T)  # half the rows with no prefix
    lo = rng.integers(0, S, T)
    hi = lo + rng.integers(0, S // 2, T)
    j = np.arange(S)[None, :]
    allowed = lambda: (j < visible[:, None]) | ((j >= lo[:, None]) & (j < hi[:, None]))  # noqa: E731 span_mask
    visible[~allowed().any(-1)] = 1  # every row must see a key
    spans = (a.astype(np.int32) for a in (visible, lo, hi))
    return Layout(B, Hq, Hkv, T, S, D, dtype, splits, 0, *spans, allowed())


LAYOUTS = [block_layout(c) for c in CASES]
SPAN_LAYOUTS = [predraft_layout(c) for c in PREDRAFT_CASES] + [random_layout(c) for c in RANDOM_CASES]
CASE_IDS = [f"T{c[3]}-off{c[4]}-cp{c[5]}-G{c[1] // c[2]}-D{c[6]}-{c[7]}-split{c[8]}" for c in CASES]
SPAN_IDS = [f"predraft-off{c[3]}-p{c[4]}-m{c[5]}-k{c[6]}-G{c[1] // c[2]}-D{c[7]}-{c[8]}-split{c[9]}"
            for c in PREDRAFT_CASES] + [f"random-T{c[3]}-S{c[4]}-G{c[1] // c[2]}-D{c[5]}-{c[6]}-split{c[7]}"
                                        for c in RANDOM_CASES]  # fmt: skip


def reference(q, k, v, scale, allowed):
    """numpy float64: q [B, Hq, T, D], k/v [B, Hkv, S, D]; new query t sees key j iff allowed[t, j]."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    group = q.shape[1] // k.shape[1]
    k, v = np.repeat(k, group, axis=1), np.repeat(v, group, axis=1)
    s = np.where(allowed, scale * q @ k.swapaxes(-1, -2), -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    return (p / p.sum(-1, keepdims=True)) @ v


def make_case(lay: Layout, seed=0):
    """Numpy buffers and strided views like the decode loop's: q [B, Hq, T, D] transposed from [B, T, Hq, D],
    k/v [B, Hkv, S, D] sliced from caches of capacity S + spare. Half-precision values are rounded."""
    rng = np.random.default_rng(seed)
    rnd = (lambda a: a.astype(np.float16).astype(np.float32)) if lay.dtype == "float16" else (lambda a: a)
    q_base = rnd(rng.standard_normal((lay.B, lay.T, lay.Hq, lay.D), dtype=np.float32))
    k_cache = rnd(rng.standard_normal((lay.B, lay.Hkv, lay.S + lay.spare, lay.D), dtype=np.float32))
    v_cache = rnd(rng.standard_normal((lay.B, lay.Hkv, lay.S + lay.spare, lay.D), dtype=np.float32))
    views = (q_base.transpose(0, 2, 1, 3), k_cache[:, :, : lay.S], v_cache[:, :, : lay.S])
    return (q_base, k_cache, v_cache), views, lay.D**-0.5


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
    """{(dtype, D): executable} of the kernel source inside MLX's generated signature, one per template set."""
    kernels = {}
    for lay in LAYOUTS + SPAN_LAYOUTS:
        name = f"custom_kernel_{mk.NAME}_{lay.dtype}_{lay.D}"
        template = mk.launch((1, 1, 1, lay.D), (1, 1, 1, lay.D), 1)["template"]
        args = (name, mk.kernel_source(), mk.INPUT_NAMES, emulated_inputs(lay)[0], mk.OUTPUT_NAMES,
                ["float32", "float32"], template)  # fmt: skip
        kernels.setdefault((lay.dtype, lay.D), args)
    return emulate.build(tmp_path_factory.mktemp("metal_emulator"), kernels)


def strided_view(a: np.ndarray):
    """(base, view): a as every other entry of a buffer whose other entries are junk, so strides must be read."""
    base = np.full(2 * a.size, -7, np.int32)
    base[::2] = a
    return base, base[::2]


def emulated_inputs(lay: Layout):
    """The kernel's inputs for the emulator, and the numpy views they stand for."""
    (q_base, k_cache, v_cache), (q, k, v), scale = make_case(lay)
    inputs = [
        emulate.Input.view(lay.dtype, q_base, q),
        emulate.Input.view(lay.dtype, k_cache, k),
        emulate.Input.view(lay.dtype, v_cache, v),
        *(emulate.Input.view("int32", *strided_view(a)) for a in (lay.visible, lay.lo, lay.hi)),
        emulate.Input("float32", scale),
    ]
    return inputs, (q, k, v), scale


def run_emulated(emulator, lay: Layout):
    inputs, (q, k, v), scale = emulated_inputs(lay)
    cfg = mk.launch(q.shape, k.shape, lay.splits)
    sizes = [int(np.prod(s)) for s in cfg["output_shapes"]]
    out, lse = emulate.run(emulator[(lay.dtype, lay.D)], inputs, sizes, cfg["grid"], cfg["threadgroup"])
    out, lse = (mx.array(a.reshape(s)) for a, s in zip((out, lse), cfg["output_shapes"]))
    got = np.array(mk.merge_splits(out, lse, mx.float32))
    return got, reference(q, k, v, scale, lay.allowed)


@pytest.mark.slow  # ~17 s of CPU, mostly g++ building the four template sets
@pytest.mark.parametrize("lay", LAYOUTS, ids=CASE_IDS)
def test_emulated_kernel_matches_numpy(emulator, lay):
    got, want = run_emulated(emulator, lay)
    err = np.abs(got - want).max()
    assert err <= TOL[lay.dtype], f"max abs diff {err:.3g}"


@pytest.mark.slow
@pytest.mark.parametrize("lay", SPAN_LAYOUTS, ids=SPAN_IDS)
def test_emulated_span_kernel_matches_numpy(emulator, lay):
    assert lay.allowed.any(-1).all()  # the kernel gives 0 for a row without keys, SDPA is undefined there
    got, want = run_emulated(emulator, lay)
    err = np.abs(got - want).max()
    assert err <= TOL[lay.dtype], f"max abs diff {err:.3g}"


@pytest.mark.parametrize("offset,pending,m,k", [(0, 1, 0, 1), (0, 1, 0, 4), (37, 2, 3, 4), (5, 3, 4, 8),
                                                (1500, 1, 2, 2), (9, 2, 5, 1)])  # fmt: skip
def test_predraft_spans_match_definition(offset, pending, m, k):
    """span_mask(predraft_spans) against the layout re-derived one (row, key) pair at a time."""
    positions, visible, lo, hi = predraft_spans(offset, pending, m, k)
    c = pending + m  # causal rows: pending tokens, then the drafts
    T = c + (m + 1) * k
    S = offset + T
    want = np.zeros((T, S), bool)
    want_positions = np.zeros(T, np.int64)
    for t in range(T):
        if t < c:  # causal: the cache and the rows up to itself
            want_positions[t] = offset + t
            for j in range(S):
                want[t, j] = j <= offset + t
        else:  # j-th mask of block i: the cache, the pending tokens, d1..di, and its own k keys
            i, jj = (t - c) // k, (t - c) % k
            want_positions[t] = offset + pending + i + jj
            own = offset + c + i * k
            for j in range(S):
                want[t, j] = j < offset + pending + i or own <= j < own + k
    assert positions.shape == visible.shape == lo.shape == hi.shape == (T,)
    np.testing.assert_array_equal(np.array(positions), want_positions)
    np.testing.assert_array_equal(np.array(span_mask(visible, lo, hi, S)), want)
    assert want.any(-1).all()


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_block_spans_are_the_inference_mask(case):
    T, offset, cp = case[3:6]
    spans = mk.block_spans(T, offset, cp)
    assert all(a.dtype == mx.int32 and a.shape == (T,) for a in spans)
    got = np.array(span_mask(*spans, offset + T))
    np.testing.assert_array_equal(got, block_allowed(T, offset, cp))
    np.testing.assert_array_equal(got, np.array(inference_mask(T, offset, cp)))


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


def to_mx(lay: Layout, dtype=None):
    """The same strided views as MLX arrays: slices of cache arrays and a transposed q, as in the decode loop."""
    (q_base, k_cache, v_cache), (q, k, v), scale = make_case(lay)
    dt = getattr(mx, dtype or lay.dtype)
    S = k.shape[2]
    mq = mx.array(q_base).astype(dt).transpose(0, 2, 1, 3)
    mk_, mv = (mx.array(c).astype(dt)[:, :, :S] for c in (k_cache, v_cache))
    return (mq, mk_, mv), (q, k, v), scale


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_reference_path_matches_numpy(case):
    offset, cp = case[4], case[5]
    lay = block_layout(case)
    (mq, mk_, mv), (q, k, v), scale = to_mx(lay, "float32")
    got = np.array(block_attention(mq, mk_, mv, scale, offset, BlockMask(cp)))
    assert np.abs(got - reference(q, k, v, scale, lay.allowed)).max() <= 1e-5


@pytest.mark.parametrize("lay", SPAN_LAYOUTS, ids=SPAN_IDS)
def test_span_reference_path_matches_numpy(lay):
    """attention() with a SpanMask: the kernel on a Mac, SDPA with the dense mask elsewhere."""
    (mq, mk_, mv), (q, k, v), scale = to_mx(lay, "float32")
    mask = make_span_mask(*(mx.array(a) for a in (lay.visible, lay.lo, lay.hi)), lay.S)
    got = np.array(attention(mq, mk_, mv, scale, mask))
    assert np.abs(got - reference(q, k, v, scale, lay.allowed)).max() <= 1e-5


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
    rows = mx.zeros((4,), mx.int32)
    assert mk.supported_spans(q, kv, kv, rows, rows, rows)  # any key length
    assert mk.supported_spans(q, kv, kv, rows.astype(mx.int64), rows, rows.astype(mx.uint32))
    assert not mk.supported_spans(q, kv, kv, mx.zeros((5,), mx.int32), rows, rows)  # one entry per row
    assert not mk.supported_spans(q, kv, kv, rows, rows.astype(mx.float32), rows)
    assert not mk.supported_spans(q, kv, kv, rows, rows, rows[None])
    assert not mk.supported_spans(q, kv.astype(mx.float32), kv, rows, rows, rows)


@pytest.mark.skipif(mx.metal.is_available(), reason="Linux behaviour")
def test_no_metal_means_reference_path():
    (mq, mk_, mv), _, scale = to_mx(LAYOUTS[3])
    assert mk.metal_block_attention(mq, mk_, mv, scale, 60, 4) is None
    lay = SPAN_LAYOUTS[1]
    (mq, mk_, mv), _, scale = to_mx(lay)
    assert mk.metal_span_attention(mq, mk_, mv, scale, *(mx.array(a) for a in (lay.visible, lay.lo, lay.hi))) is None


# --- on a Mac --------------------------------------------------------------------------------------------
METAL_TOL = {"float32": 1e-5, "float16": 4e-3, "bfloat16": 3e-2}


@needs_metal
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_metal_kernel_matches_reference(case, dtype):
    offset, cp = case[4], case[5]
    lay = block_layout(case)
    (mq, mk_, mv), (q, k, v), scale = to_mx(lay, dtype)
    got = mk.metal_block_attention(mq, mk_, mv, scale, offset, BlockMask(cp))
    assert got is not None and got.dtype == mq.dtype
    want = reference(*(np.array(a.astype(mx.float32)) for a in (mq, mk_, mv)), scale, lay.allowed)
    assert np.abs(np.array(got.astype(mx.float32)) - want).max() <= METAL_TOL[dtype]


@needs_metal
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("lay", SPAN_LAYOUTS, ids=SPAN_IDS)
def test_metal_span_kernel_matches_reference(lay, dtype):
    (mq, mk_, mv), (q, k, v), scale = to_mx(lay, dtype)
    spans = [mx.array(a) for a in (lay.visible, lay.lo, lay.hi)]
    got = mk.metal_span_attention(mq, mk_, mv, scale, *spans)
    assert got is not None and got.dtype == mq.dtype
    want = reference(*(np.array(a.astype(mx.float32)) for a in (mq, mk_, mv)), scale, lay.allowed)
    assert np.abs(np.array(got.astype(mx.float32)) - want).max() <= METAL_TOL[dtype]
    sliced = [mx.array(strided_view(a)[0])[::2] for a in (lay.visible, lay.lo, lay.hi)]  # read through strides
    assert mx.array_equal(mk.metal_span_attention(mq, mk_, mv, scale, *sliced), got)


@needs_metal
def test_metal_kernel_long_cache_splits():
    lay = block_layout((1, 32, 8, 16, 5000, 8, 128, "float16", 1, 100))
    (mq, mk_, mv), (q, k, v), scale = to_mx(lay)
    got = mk.metal_block_attention(mq, mk_, mv, scale, 5000, 8)
    want = reference(*(np.array(a.astype(mx.float32)) for a in (mq, mk_, mv)), scale, lay.allowed)
    assert np.abs(np.array(got.astype(mx.float32)) - want).max() <= METAL_TOL["float16"]
    lay = predraft_layout((1, 32, 8, 5000, 2, 3, 4, 128, "float16", 1, 100))
    (mq, mk_, mv), (q, k, v), scale = to_mx(lay)
    got = mk.metal_span_attention(mq, mk_, mv, scale, *(mx.array(a) for a in (lay.visible, lay.lo, lay.hi)))
    want = reference(*(np.array(a.astype(mx.float32)) for a in (mq, mk_, mv)), scale, lay.allowed)
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

