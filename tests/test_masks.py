"""masks.training_mask / inference_mask against plain-Python constructions of SBD_METHOD.md §2 and §3."""

import mlx.core as mx
import numpy as np
import pytest

from mlx_sbd.masks import inference_mask, training_mask


def table_mask(L: int, k: int, length: int, shift: int = 0) -> np.ndarray:
    """[2L, 2L] straight from the §2 table, one (query, key) pair at a time. Positions >= length are
    padding: never attended by valid queries; a padding query attends only to itself."""
    M = np.zeros((2 * L, 2 * L), bool)
    for q in range(2 * L):
        for kv in range(2 * L):
            i, j = q % L, kv % L
            if i >= length:
                M[q, kv] = q == kv
                continue
            if j >= length:
                continue
            if q < L:  # clean query: causal over clean keys, never a noised key
                M[q, kv] = kv < L and j <= i
            else:  # noised query in block b: clean keys strictly before the block, its own noised block
                start = (i + shift) // k * k - shift  # the grid shifted by `shift`: blocks [b*k - shift, ...)
                M[q, kv] = (kv < L and j < start) or (kv >= L and start <= j < start + k)
    return M


# The worked check of §2 (L=8, k=4); rows are queries, columns keys, clean x0..x7 then noised x0'..x7'.
PAPER_L8_K4 = """
1....... ........
11...... ........
111..... ........
1111.... ........
11111... ........
111111.. ........
1111111. ........
11111111 ........
........ 1111....
........ 1111....
........ 1111....
........ 1111....
1111.... ....1111
1111.... ....1111
1111.... ....1111
1111.... ....1111
"""


def test_paper_picture_L8_k4():
    expected = np.array([[c == "1" for c in line.replace(" ", "")] for line in PAPER_L8_K4.strip().splitlines()])
    assert expected.shape == (16, 16)
    np.testing.assert_array_equal(np.array(training_mask(8, 4)), expected)
    # noised block 0 sees only itself; noised block 1 sees clean x0..x3 plus itself
    assert expected[8:12].nonzero()[1].tolist() == [8, 9, 10, 11] * 4
    assert sorted(set(expected[12:16].nonzero()[1].tolist())) == [0, 1, 2, 3, 12, 13, 14, 15]


@pytest.mark.parametrize("seed", range(6))
def test_training_mask_matches_table_random(seed):
    rng = np.random.default_rng(seed)
    L = int(rng.integers(1, 24))
    k = int(rng.integers(1, L + 3))  # includes k = 1, k not dividing L, and k > L
    np.testing.assert_array_equal(np.array(training_mask(L, k)), table_mask(L, k, L))

    lengths = rng.integers(0, L + 1, 4)
    lengths[0] = L  # one row without padding
    got = np.array(training_mask(L, k, mx.array(lengths)))
    assert got.shape == (4, 1, 2 * L, 2 * L)
    for b, n in enumerate(lengths):
        np.testing.assert_array_equal(got[b, 0], table_mask(L, k, int(n)), err_msg=f"L={L} k={k} length={n}")


@pytest.mark.parametrize("L,k", [(8, 4), (13, 5), (16, 16), (7, 2)])
def test_training_mask_padding_properties(L, k):
    lengths = np.array([L, L - 1, L // 2, 1, 0])
    got = np.array(training_mask(L, k, mx.array(lengths)))[:, 0]  # [B, 2L, 2L]
    assert got.any(-1).all(), "an all-False row is undefined in MLX attention"
    pos = np.arange(2 * L) % L
    for b, n in enumerate(lengths):
        valid = pos < n
        assert not got[b][np.ix_(valid, ~valid)].any(), "valid query attends a padding key"
        np.testing.assert_array_equal(got[b][~valid], np.eye(2 * L, dtype=bool)[~valid])


def rule_mask(q_len: int, offset: int, causal_point: int) -> np.ndarray:
    return np.array(
        [[j <= offset + i or i >= causal_point for j in range(offset + q_len)] for i in range(q_len)], bool
    )


@pytest.mark.parametrize("seed", range(8))
def test_inference_mask_matches_rule(seed):
    rng = np.random.default_rng(100 + seed)
    q_len, offset = int(rng.integers(1, 33)), int(rng.integers(0, 40))
    for causal_point in {0, q_len, int(rng.integers(0, q_len + 1))}:
        got = np.array(inference_mask(q_len, offset, causal_point))
        assert got.shape == (q_len, offset + q_len)
        np.testing.assert_array_equal(got, rule_mask(q_len, offset, causal_point))


def test_inference_mask_edge_cases():
    # causal_point = q_len: an ordinary causal step over the cache; causal_point = 0: every query sees all.
    np.testing.assert_array_equal(np.array(inference_mask(3, 2, 3)), np.tril(np.ones((3, 5), bool), 2))
    assert np.array(inference_mask(3, 2, 0)).all()
    # The SBD first forward of a block: k=2 previous tokens causal, then the k=2 block sees everything.
    np.testing.assert_array_equal(
        np.array(inference_mask(4, 1, 2)),
        np.array([[1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 1, 1, 1, 1]], bool),
    )


@pytest.mark.parametrize("L,k", [(8, 4), (13, 3), (16, 5)])
def test_shifted_grid_matches_the_table(L, k):
    """Random grid shifts per sequence (gated training): sequence b's blocks start at multiples of k minus its shift."""
    lengths, shifts = [L, L - 3, 5], [1, k - 1, 0]
    got = np.array(training_mask(L, k, mx.array(lengths), mx.array(shifts)))
    for b, (n, o) in enumerate(zip(lengths, shifts)):
        assert np.array_equal(got[b, 0], table_mask(L, k, n, o)), (b, n, o)
