"""The SBD loss (paper Eq. 14): NTP on the clean half plus MATP on the masked positions of the noised half.

Normalisation (the paper leaves it open):
    NTP  = sum of cross-entropies over clean positions with a label / their number
    MATP = sum of cross-entropies over masked noised positions / their number (0 when nothing is masked)
    loss = NTP + MATP
Each term is a per-token mean over the batch, so neither drowns the other whatever η is drawn; no 1/η weight.
With η = 0 the loss is exactly mlx_lm's default_loss (tested).

`ntp_loss` is the baseline objective (an NTP fine-tune on the same data): the clean half alone, whose causal
block of the training mask makes it an ordinary forward, so it costs half the doubled input and trains no MATP.
"""

import mlx.core as mx
import mlx.nn as nn

from .batches import Batch


def sbd_loss(model, batch: Batch):
    """-> (loss, ntp, matp, ntokens); ntokens = number of NTP labels (what mlx_lm counts)."""
    logits = model.forward(batch["tokens"], positions=batch["positions"], mask=batch["mask"])  # [B, 2L, V]
    L = batch["ntp_targets"].shape[1]
    logits = logits.astype(mx.float32)
    ntp_ce = nn.losses.cross_entropy(logits[:, :L], batch["ntp_targets"]) * batch["ntp_weights"]  # [B, L]
    matp_ce = nn.losses.cross_entropy(logits[:, L:], batch["matp_targets"]) * batch["matp_weights"]
    n_ntp = batch["ntp_weights"].sum()
    n_matp = batch["matp_weights"].sum()
    ntp = ntp_ce.sum() / mx.maximum(n_ntp, 1)
    matp = matp_ce.sum() / mx.maximum(n_matp, 1)
    return ntp + matp, ntp, matp, n_ntp


def ntp_loss(model, batch: Batch):
    """NTP only, on the clean half [B, L] -> (loss, ntp, matp = 0, ntokens), the tuple of sbd_loss."""
    L = batch["ntp_targets"].shape[1]
    logits = model.forward(batch["tokens"][:, :L], positions=batch["positions"][:, :L],
                           mask=batch["mask"][:, :, :L, :L]).astype(mx.float32)  # [B, L, V]
    ntp_ce = nn.losses.cross_entropy(logits, batch["ntp_targets"]) * batch["ntp_weights"]
    n_ntp = batch["ntp_weights"].sum()
    ntp = ntp_ce.sum() / mx.maximum(n_ntp, 1)
    return ntp, ntp, mx.zeros_like(ntp), n_ntp


LOSSES = {"sbd": sbd_loss, "ntp": ntp_loss}
