"""The SBD loss: a numpy re-derivation on a toy batch, clean-half isolation, and η = 0 == mlx_lm's NTP loss;
the NTP-only baseline loss == mlx_lm's NTP loss whatever the noised half holds."""

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.tuner.trainer import default_loss

from mlx_sbd import load
from mlx_sbd.batches import make_batch
from mlx_sbd.loss import ntp_loss, sbd_loss
from mlx_sbd.model import MASK_ID
from mlx_sbd.tiny import make_tiny_model

SEQS = [([5, 6, 7, 8, 9, 10, 11, 2], 3), ([12, 13, 14, 15, 2], 0), ([20, 21, 22, 23, 24, 25, 26, 27, 28, 2], 0)]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    folder = make_tiny_model(tmp_path_factory.mktemp("tiny"), hidden_size=32, num_hidden_layers=2,
                             num_attention_heads=2, num_key_value_heads=1, intermediate_size=64, seed=1)
    return load(folder)[0]


def log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_loss_matches_hand_computation(model):
    batch = make_batch(SEQS, k=4, rng=np.random.default_rng(5), eta=[0.6, 0.5, 0.7])
    logits = np.array(model.forward(batch["tokens"], positions=batch["positions"], mask=batch["mask"]))
    lp = log_softmax(logits.astype(np.float64))
    L = logits.shape[1] // 2
    noised = np.array(batch["tokens"])[:, L:]
    ntp, matp = [], []
    for b, (seq, offset) in enumerate(SEQS):  # labels re-derived from the raw sequences, not from the batch
        for j in range(len(seq) - 1):
            if j + 1 >= offset:
                ntp.append(-lp[b, j, seq[j + 1]])
        for j in range(len(seq)):
            if noised[b, j] == MASK_ID:
                assert j >= offset
                matp.append(-lp[b, L + j, seq[j]])
    assert len(matp) > 3
    loss, got_ntp, got_matp, ntok = sbd_loss(model, batch)
    assert ntok.item() == len(ntp)
    np.testing.assert_allclose(got_ntp.item(), np.mean(ntp), rtol=1e-5)
    np.testing.assert_allclose(got_matp.item(), np.mean(matp), rtol=1e-5)
    np.testing.assert_allclose(loss.item(), np.mean(ntp) + np.mean(matp), rtol=1e-5)


def test_clean_half_ignores_noised_half(model):
    batch = make_batch(SEQS, k=4, rng=np.random.default_rng(0))
    L = batch["ntp_targets"].shape[1]
    logits = model.forward(batch["tokens"], positions=batch["positions"], mask=batch["mask"])
    tokens = np.array(batch["tokens"])
    rng = np.random.default_rng(1)
    tokens[:, L:] = np.where(rng.random((3, L)) < 0.5, MASK_ID, rng.integers(4, 60, size=(3, L)))
    perturbed = model.forward(mx.array(tokens), positions=batch["positions"], mask=batch["mask"])
    np.testing.assert_array_equal(np.array(logits[:, :L]), np.array(perturbed[:, :L]))
    assert not np.allclose(np.array(logits[:, L:]), np.array(perturbed[:, L:]))


def mlx_lm_ntp_loss(model):
    # mlx_lm's batch layout: [B, T] right-padded ids and [[offset, length]]. Its mask `steps <= length` counts one
    # pad target per row (ml-explore/mlx-lm PR #1697), so give it length - 1: the real targets only.
    T = max(len(s) for s, _ in SEQS) + 1
    ids = np.zeros((len(SEQS), T), np.int32)
    for i, (s, _) in enumerate(SEQS):
        ids[i, : len(s)] = s
    lengths = mx.array([[o, len(s) - 1] for s, o in SEQS])
    return default_loss(model, mx.array(ids), lengths)


def test_eta_zero_is_mlx_lm_ntp_loss(model):
    batch = make_batch(SEQS, k=8, rng=np.random.default_rng(0), eta=[0.0, 0.0, 0.0])
    loss, ntp, matp, ntok = sbd_loss(model, batch)
    assert matp.item() == 0.0
    ref, ref_ntok = mlx_lm_ntp_loss(model)
    assert ntok.item() == ref_ntok.item()
    np.testing.assert_allclose(loss.item(), ref.item(), rtol=1e-5)


def test_ntp_objective_is_mlx_lm_ntp_loss(model):
    batch = make_batch(SEQS, k=8, rng=np.random.default_rng(0), eta=[0.9, 0.8, 1.0])  # a heavily masked noised half
    loss, ntp, matp, ntok = ntp_loss(model, batch)
    ref, ref_ntok = mlx_lm_ntp_loss(model)
    assert matp.item() == 0.0 and ntok.item() == ref_ntok.item()
    np.testing.assert_allclose([loss.item(), ntp.item()], [ref.item(), ref.item()], rtol=1e-5)
    sbd_total, _, sbd_matp, _ = sbd_loss(model, batch)
    assert sbd_matp.item() > 0 and not np.isclose(sbd_total.item(), loss.item())  # the MATP term really is dropped
