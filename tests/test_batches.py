"""Doubled SBD batches: tokens, positions, labels and loss weights against hand-written arrays; data order."""

import numpy as np
import pytest

from mlx_sbd.batches import PAD_TO, batch_numbers, batch_order, make_batch
from mlx_sbd.errors import SBDError
from mlx_sbd.masks import training_mask
from mlx_sbd.model import MASK_ID

M = MASK_ID


def padded(values, L=PAD_TO, fill=0):
    return np.array(list(values) + [fill] * (L - len(values)))


def test_toy_batch_by_hand():
    # Sequence 0: prompt [5, 6] + completion [7, 8] + EOS 2, fully masked (η = 1). Sequence 1: no prompt, η = 0.
    seqs = [([5, 6, 7, 8, 2], 2), ([9, 10, 2], 0)]
    b = make_batch(seqs, k=2, rng=np.random.default_rng(0), eta=[1.0, 0.0])
    L = PAD_TO
    tokens = np.array(b["tokens"])
    assert tokens.shape == (2, 2 * L)
    # clean half = the sequence (incl. EOS), padded with 0
    np.testing.assert_array_equal(tokens[0, :L], padded([5, 6, 7, 8, 2]))
    np.testing.assert_array_equal(tokens[1, :L], padded([9, 10, 2]))
    # noised half: prompt tokens never masked; every completion token (incl. EOS) masked at η = 1; none at η = 0
    np.testing.assert_array_equal(tokens[0, L:], padded([5, 6, M, M, M]))
    np.testing.assert_array_equal(tokens[1, L:], padded([9, 10, 2]))
    # positions repeat
    np.testing.assert_array_equal(np.array(b["positions"]), np.tile(np.arange(L), (2, 2)))
    # NTP: shifted labels, only where the label is a real, non-prompt token
    np.testing.assert_array_equal(np.array(b["ntp_targets"])[0, :5], [6, 7, 8, 2, 0])
    np.testing.assert_array_equal(np.array(b["ntp_weights"])[0], padded([0, 1, 1, 1]))
    np.testing.assert_array_equal(np.array(b["ntp_targets"])[1, :3], [10, 2, 0])
    np.testing.assert_array_equal(np.array(b["ntp_weights"])[1], padded([1, 1]))
    # MATP: same-position labels at masked positions only
    np.testing.assert_array_equal(np.array(b["matp_targets"])[0, :5], [5, 6, 7, 8, 2])
    np.testing.assert_array_equal(np.array(b["matp_weights"])[0], padded([0, 0, 1, 1, 1]))
    np.testing.assert_array_equal(np.array(b["matp_weights"])[1], np.zeros(L))
    # the mask is the one from masks.training_mask, with padding lengths
    np.testing.assert_array_equal(np.array(b["mask"]), np.array(training_mask(L, 2, np.array([5, 3]))))


def test_draft_positions_by_hand():
    """Draft positions are masked tokens after a masked token of their own block: prompt [1, 2, 3] + answer of 7, all
    masked, k = 4. With the grid shifted by 1 blocks are {0,1,2}, {3..6}, {7..9}: 3 opens a block after the clean
    prompt and 7 a new block, so 4, 5, 6, 8, 9 are drafts. Then a loop over random shifts and noise."""
    seq = ([1, 2, 3, 4, 5, 6, 7, 8, 9, 10], 3)
    for seed in range(50):
        b = make_batch([seq], k=4, rng=np.random.default_rng(seed), eta=[1.0], shift_blocks=True, trim=False)
        if int(np.array(b["block_shifts"])[0]) == 1:
            break
    np.testing.assert_array_equal(np.array(b["draft_weights"])[0], padded([0, 0, 0, 0, 1, 1, 1, 0, 1, 1]))
    rng = np.random.default_rng(1)
    for _ in range(30):
        n, k = int(rng.integers(3, 40)), int(rng.integers(2, 9))
        b = make_batch([(list(range(1, n + 1)), int(rng.integers(0, n)))], k=k, rng=rng, shift_blocks=True, trim=False)
        o = int(np.array(b["block_shifts"])[0])
        masked = np.array(b["matp_weights"])[0] > 0
        want = [j > 0 and masked[j] and masked[j - 1] and (j + o) % k != 0 for j in range(len(masked))]
        np.testing.assert_array_equal(np.array(b["draft_weights"])[0] > 0, want)


def test_padding_never_attended_nor_in_loss():
    seqs = [([3, 4, 5, 6, 7, 2], 0), ([8, 2], 0)]
    b = make_batch(seqs, k=4, rng=np.random.default_rng(1))
    L = PAD_TO
    mask = np.array(b["mask"])[:, 0]  # [B, 2L, 2L]
    for i, n in enumerate([6, 2]):
        real = np.zeros(2 * L, bool)
        real[:n] = real[L : L + n] = True
        assert not mask[i][np.ix_(real, ~real)].any()  # no real query sees a padding key
        assert mask[i].any(axis=1).all()  # no all-False row (SBD_METHOD.md trap 9)
        assert not np.array(b["ntp_weights"])[i, n - 1 :].any()
        assert not np.array(b["matp_weights"])[i, n:].any()


def test_masking_rate_follows_eta():
    seq = (list(range(4, 4 + 1000)), 0)
    rng = np.random.default_rng(0)
    b = make_batch([seq] * 3, k=8, rng=rng, eta=[0.1, 0.5, 0.9])
    rates = np.array(b["matp_weights"]).sum(axis=1) / 1000
    np.testing.assert_allclose(rates, [0.1, 0.5, 0.9], atol=0.05)
    noised = np.array(b["tokens"])[:, b["ntp_targets"].shape[1] :]
    np.testing.assert_array_equal(noised == M, np.array(b["matp_weights"]) == 1)
    # η ~ U(0, 1) per sequence when not forced: rates spread over (0, 1)
    rates = [np.array(make_batch([seq], 8, np.random.default_rng(s))["matp_weights"]).mean() for s in range(20)]
    assert min(rates) < 0.3 and max(rates) > 0.7


def test_batches_length_sorted_and_resumable():
    data = [(list(range(n)), 0) for n in np.random.default_rng(0).integers(2, 50, size=23)]
    order = batch_order(data, 4)
    assert len(order) == 5  # remainder dropped
    lengths = [[len(data[i][0]) for i in b] for b in order]
    assert all(max(a) <= min(b) for a, b in zip(lengths, lengths[1:]))
    def stream(start=0):  # the training loop's batches: batch_order's groups in batch_numbers' order
        return ([data[i] for i in order[b]] for b in batch_numbers(len(order), seed=3, start=start))

    batches = stream()
    first = [next(batches) for _ in range(12)]
    assert sorted(map(str, first[:5])) == sorted(str([data[i] for i in b]) for b in order)  # an epoch = every batch
    resumed = stream(start=7)
    assert [next(resumed) for _ in range(5)] == first[7:12]
    with pytest.raises(SBDError, match="fewer than --batch-size"):
        batch_order(data[:3], 4)
