"""The SBD loss (paper Eq. 14): NTP on the clean half plus MATP on the masked positions of the noised half.

Normalisation (the paper leaves it open):
    NTP  = sum of cross-entropies over clean positions with a label / their number
    MATP = sum of cross-entropies over masked noised positions / their number (0 when nothing is masked)
    loss = NTP + MATP
Each term is a per-token mean over the batch, so neither drowns the other whatever η is drawn; no 1/η weight.
With η = 0 the loss is exactly mlx_lm's default_loss (tested).

`gated_sbd_loss` is the objective of a gated adapter (adapter.py): the clean half runs the base weights whatever
the adapter holds, so it runs first, once, without gradient (its keys and values stored per layer, model.PrefixKV),
and only the noised half runs with the LoRA and backpropagates, attending to those stored keys. The NTP term is a
constant then and is computed only to be logged.

`ntp_loss` is the baseline objective (an NTP fine-tune on the same data): the clean half alone, whose causal
block of the training mask makes it an ordinary forward, so it costs half the doubled input and trains no MATP.
"""

from functools import partial

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


def clean_pass(model, batch: Batch, soft: bool = True) -> dict:
    """The clean half of a gated step: the base weights (mask_rows=0), causal, no gradient. ->
    {"clean_kv": [(keys, values) of each layer],
     "clean_pw", "clean_pb": the soft targets folded into the head (below), [B, L, hidden] and [B, L] (soft only),
     "clean_ntp_ce": the NTP cross-entropies [B, L] (weighted; logged, never trained: the base is fixed),
     "clean_next": the base's argmax after each position [B, L]},
    all a function of the batch's clean tokens alone, so a run that sees a batch again can keep them
    (clean_cache.py, --cache-clean).

    Soft targets without a pass over the vocabulary: the head is affine, z = W h + b, so the expected logit under
    the base's distribution p is sum_v p_v z_v = (p W) . h + p . b. pw = p W (the head's vector-Jacobian product
    with p, whatever the head's form: tied, untied, quantized) and pb = p . b depend on the clean half only; a
    noised row's soft term is then a dot product with its hidden state, and its gradient a vector, where the
    vocabulary-wide product cost an exp, a product and their backward over 50M logits per batch on the CPU."""
    from .model import PrefixKV

    L = batch["ntp_targets"].shape[1]
    kv = [PrefixKV() for _ in model.layers]
    h = model.forward(batch["tokens"][:, :L], positions=batch["positions"][:, :L], mask="causal", cache=kv,
                      return_hidden=True, checkpoint=False)  # padding sits at the end: causal suffices
    h = mx.stop_gradient(h)
    base = model.logits(h).astype(mx.float32)  # [B, L, V]: the base's next-token logits
    # One logsumexp over the base's logits serves the NTP term and the soft targets: every pass over the
    # vocabulary is an exp per logit, which on the CPU runs one float at a time.
    lse = mx.logsumexp(base, axis=-1)  # [B, L]
    ntp_ce = (lse - mx.take_along_axis(base, batch["ntp_targets"][..., None], axis=-1)[..., 0]) * batch["ntp_weights"]
    clean = {"clean_kv": [c.kv for c in kv], "clean_ntp_ce": ntp_ce,
             "clean_next": mx.argmax(base, axis=-1).astype(mx.int32)}
    if soft:
        p = mx.exp(base - lse[..., None])
        # the vjp's own output (the head's forward again) is never evaluated: only p W is
        _, (pw,) = mx.vjp(lambda x: model.logits(x).astype(mx.float32), [h], [p])
        # p . b: a head without a bias (tied embeddings; Llama's and Qwen's lm_head) needs no pass over p for it
        tied = model.lm.args.tie_word_embeddings
        pb = (p @ model.lm.lm_head.bias.astype(mx.float32) if not tied and "bias" in model.lm.lm_head
              else mx.zeros(p.shape[:-1], mx.float32))
        clean.update(clean_pw=mx.stop_gradient(pw).astype(mx.float32), clean_pb=pb)
    return clean


def gated_sbd_loss(model, batch: Batch, targets: str = "data", block_size_max: int = None):
    """sbd_loss for a gated adapter, in two passes (see above): same masks, same normalisation; -> the tuple of
    sbd_loss plus `hits`, the draft positions (batches.make_batch: masked, after a masked token of their block)
    whose argmax is the base's next token there (teacher-forced: the clean half's argmax at the previous position),
    i.e. drafts the verifier would accept after a correct prefix.

    targets (TARGETS): what a masked position j learns. "data": the data token x_j (on the base model's own greedy
    answers it is the base's next token, what the verifier accepts). "soft": the base's whole next-token distribution
    at j, softmax of the clean half's logits at j-1, computed in this same forward, so any text is training data
    (VERIFIED_SBD.md §2). "base": that distribution's argmax. Position 0 has no previous row: its target is x_0.

    block_size_max: the largest block the batches use; given, the noised rows attend by groups to the keys they can
    see (attention.RowGroups: same result, fewer exps), else to every key through the dense mask.

    A batch that carries its clean half (clean_pass's arrays: a later epoch of a --cache-clean run) skips that pass,
    with the same loss.
    """
    from .attention import row_groups
    from .model import PrefixKV

    L = batch["ntp_targets"].shape[1]
    tokens, positions, mask = batch["tokens"], batch["positions"], batch["mask"]
    data = batch["matp_targets"]  # [B, n]: the noised half holds positions L-n..L-1 (batches.make_batch)
    n = data.shape[1]
    clean = batch if "clean_kv" in batch else clean_pass(model, batch, soft=targets == "soft")
    kv = [PrefixKV(*pair) for pair in clean["clean_kv"]]
    # The noised rows' attention by groups of rows, each over the keys it can see (attention.RowGroups).
    noised_mask = mask[..., L:, :] if block_size_max is None else row_groups(mask[..., L:, :], L, L - n, block_size_max)
    hidden = model.forward(tokens[:, L:], positions=positions[:, L:], mask=noised_mask, cache=kv, mask_rows=L,
                           checkpoint=model.grad_checkpoint, return_hidden=True)
    logits = model.logits(hidden).astype(mx.float32)  # [B, n, V]
    before = slice(L - n - 1, L - 1) if n < L else None  # rows L-n-1..L-2 predict the noised half's tokens

    def previous(x):  # [B, L, ...] -> the rows before the noised half's positions (row 0 stands in for position 0)
        return x[:, before] if before else mx.concatenate([x[:, :1], x[:, :-1]], axis=1)

    first = (mx.arange(L - n, L) == 0)[None]  # position 0 has no previous row: its data token
    base_next = mx.where(first, data, previous(clean["clean_next"]).astype(data.dtype))  # [B, n]
    if targets == "data":
        matp_ce = nn.losses.cross_entropy(logits, data)
    elif targets == "base":
        matp_ce = nn.losses.cross_entropy(logits, base_next)
    else:  # soft: cross-entropy against the base's distribution p at the previous row, logsumexp(z) - sum_v p_v z_v,
        # with sum_v p_v z_v = (p W) . h + p . b (clean_pass); the data token's z at position 0
        expected = (hidden.astype(mx.float32) * previous(clean["clean_pw"])).sum(axis=-1) + previous(clean["clean_pb"])
        expected = mx.where(first, mx.take_along_axis(logits, data[..., None], axis=-1)[..., 0], expected)
        matp_ce = mx.logsumexp(logits, axis=-1) - expected
    weights = batch["matp_weights"]
    hits = ((mx.argmax(logits, axis=-1) == base_next) * batch["draft_weights"]).sum()
    n_ntp = batch["ntp_weights"].sum()
    ntp = clean["clean_ntp_ce"].sum() / mx.maximum(n_ntp, 1)
    matp = (matp_ce * weights).sum() / mx.maximum(weights.sum(), 1)
    return ntp + matp, ntp, matp, n_ntp, hits


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
TARGETS = ("data", "soft", "base")  # what a gated adapter's masked positions learn (gated_sbd_loss)
NOISES = ("uniform", "full")  # η ~ U(0, 1) per sequence (the paper), or every eligible token masked (batches.py)


def loss_for(objective: str, gated: bool, targets: str = "data", block_size_max: int = None):
    """The loss of a run -> fn(model, batch) -> (loss, ntp, matp, ntokens, hits); hits is 0 where not measured.
    block_size_max: the run's, for the gated loss's grouped attention (gated_sbd_loss)."""
    if gated and objective == "sbd":
        return partial(gated_sbd_loss, targets=targets, block_size_max=block_size_max)
    fn = LOSSES[objective]
    return lambda model, batch: (*fn(model, batch), mx.array(0.0))
