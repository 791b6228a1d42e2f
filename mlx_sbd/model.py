"""SBDModel: an mlx_lm Llama/Qwen model plus the one forward SBD needs.

`model(tokens)` is the untouched mlx_lm causal forward. `model.forward(tokens, positions, mask, cache)` runs the
same modules (mlx_lm's projections, norms, RoPE and MLP, so LoRA and quantized layers work unchanged) with
explicit per-token positions, an arbitrary boolean mask or a decode-step BlockMask, and a learned mask
embedding substituted wherever a token id is MASK_ID. The mask token is not in the vocabulary, so the
sampler can never emit it.
"""

import weakref
from dataclasses import asdict, dataclass, fields
from typing import Any, Callable, Dict, List, Optional, Tuple

import mlx.core as mx
import mlx.nn as nn

from mlx_lm.models.cache import make_prompt_cache

from .attention import Mask, attention

MASK_ID = -1  # token id meaning "masked position"; never a vocabulary row

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


class PerModel:
    """Values kept for each live model object (its measured costs, its learned acceptance): keyed by id(model) and
    dropped when the model is freed, because a model loaded later can get a freed one's id."""

    def __init__(self):
        self._items: Dict[Tuple[int, Any], Any] = {}

    def get(self, model, key: Any, make: Callable[[], Any]) -> Any:
        k = (id(model), key)
        if k not in self._items:
            self._items[k] = make()
            weakref.finalize(model, self._items.pop, k, None)
        return self._items[k]

    def drop(self, model) -> None:
        """Forget every value kept for `model` (as if it were new)."""
        for k in [k for k in self._items if k[0] == id(model)]:
            del self._items[k]


class Gate:
    """How many trailing rows of the forward now running are mask-block rows (0: none, the plain causal call).
    One per model, shared by its gated LoRA layers (adapter.py); SBDModel.forward sets it."""

    def __init__(self):
        self.rows = 0
        self._columns = {}  # (T, rows, dtype) -> [T, 1]: decoding repeats a few shapes, so each is built once
        self._last = (None, None)  # (x, x on mask rows only): q/k/v (and gate/up) share their input

    def column(self, T: int, dtype) -> mx.array:
        """[T, 1]: 1 on the last `rows` of T rows (mask rows), 0 on the others."""
        key = (T, self.rows, dtype)
        if key not in self._columns:
            if len(self._columns) >= 256:  # many prompt lengths (a server): start over rather than grow
                self._columns.clear()
            self._columns[key] = (mx.arange(T) >= T - self.rows).astype(dtype)[:, None]
        return self._columns[key]

    def masked(self, x: mx.array) -> mx.array:
        """x [..., T, d] with its causal rows zeroed, computed once for the projections that share x (the same
        array object: holding it keeps its id from being reused)."""
        if self._last[0] is not x:
            self._last = (x, x * self.column(x.shape[-2], x.dtype))
        return self._last[1]

    def done(self) -> None:
        """The forward is over: drop the held input."""
        self._last = (None, None)


@dataclass(frozen=True)
class SBDSettings:
    """What an SBD adapter or fused model was trained with, and the decode settings it recommends.

    Stored as the "sbd" section of adapter_config.json / config.json. A model without it was never trained
    for SBD, so the CLI decodes it one token per forward unless asked otherwise.
    """

    block_size_max: int = 16
    block_size: int = 16  # recommended decode block size
    gamma: float = 0.1  # recommended EB-Sampler budget
    # How often the mask block's draft at each position passed verification, given the drafts before it did,
    # measured on held-out prompts when the adapter was made (heldout.measure): --draft auto's starting estimate.
    draft_acceptance: Optional[List[float]] = None

    @classmethod
    def from_dict(cls, d: dict) -> "SBDSettings":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def to_dict(self) -> dict:
        return asdict(self)


class SBDModel(nn.Module):
    def __init__(self, lm: nn.Module, mask_embedding: Optional[mx.array] = None, sbd: Optional[SBDSettings] = None):
        super().__init__()
        self.lm = lm
        self.sbd = sbd  # None: not trained for SBD
        self.corpus = None  # the model's earlier answers lookup drafts come from (corpus.Corpus; its adapter's)
        self.grad_checkpoint = False  # training: recompute each block's activations in the backward pass
        self.gate = Gate()  # gated LoRA layers read how many trailing rows are mask rows (adapter.py)
        args = lm.args
        if getattr(args, "sliding_window", None) and "sliding_attention" in (args.layer_types or []):
            raise ValueError("Sliding-window attention layers are not supported by mlx-sbd.")
        # Start the mask embedding at the mean token embedding: a neutral input the model has seen the like of.
        if mask_embedding is None:
            mask_embedding = _mean_embedding(lm.model.embed_tokens)
        self.mask_embedding = mask_embedding

    # --- what mlx_lm's generate/tuner expect of a model ---------------------------------------------------
    def __call__(self, inputs: mx.array, cache: Optional[List[Any]] = None, **kwargs) -> mx.array:
        return self.lm(inputs, cache=cache, **kwargs)

    @property
    def layers(self):
        return self.lm.layers

    @property
    def args(self):
        return self.lm.args

    @property
    def model_type(self) -> str:
        return self.lm.args.model_type

    def make_cache(self):
        return make_prompt_cache(self.lm)

    # --- the SBD forward ----------------------------------------------------------------------------------
    def embed(self, tokens: mx.array) -> mx.array:
        """[B, T] ids (MASK_ID allowed) -> [B, T, hidden]."""
        is_mask = tokens == MASK_ID
        h = self.lm.model.embed_tokens(mx.where(is_mask, 0, tokens))
        return mx.where(is_mask[..., None], self.mask_embedding.astype(h.dtype), h)

    def forward(
        self,
        tokens: mx.array,
        positions: Optional[mx.array] = None,
        mask: Mask = "causal",
        cache: Optional[List[Any]] = None,
        return_hidden: bool = False,
        mask_rows: int = 0,
        checkpoint: Optional[bool] = None,
    ) -> mx.array:
        """tokens [B, T], or [T] for one sequence, which then runs as [T, hidden] throughout (a decode step: the
        batch axis costs a flatten and an unflatten around every matmul, and on small models every op shows);
        absolute positions [B, T] or [T] (None: cache offset + 0..T-1); mask over (cache + new) keys:
        None, "causal", a boolean array broadcastable to [B, H, T, S], or a BlockMask. `mask_rows`: how many trailing
        rows are mask-block rows, the only ones a gated adapter's LoRA reaches (ignored by ungated weights).
        `checkpoint` (default: grad_checkpoint, when there is no cache) recomputes each block in the backward pass.
        Returns logits [B, T, vocab] (or the final hidden states [B, T, hidden] with return_hidden), [T, ...] for
        tokens [T]."""
        h = self.embed(tokens)
        if positions is not None and positions.ndim == 1:
            positions = mx.broadcast_to(positions, tokens.shape)
        if checkpoint is None:
            checkpoint = self.grad_checkpoint and cache is None
        self.gate.rows = mask_rows
        try:
            for i, layer in enumerate(self.lm.layers):
                c = cache[i] if cache is not None else None
                h = checkpointed_block(layer, h, positions, mask, c) if checkpoint else block(layer, h, positions, mask, c)
        finally:
            self.gate.rows = 0  # the plain causal call (model(tokens), mlx_lm's generate) is always the base
            self.gate.done()
        h = self.lm.model.norm(h)
        return h if return_hidden else self.logits(h)

    def logits(self, h: mx.array) -> mx.array:
        if self.lm.args.tie_word_embeddings:
            return self.lm.model.embed_tokens.as_linear(h)
        return self.lm.lm_head(h)


def block(layer: nn.Module, h: mx.array, positions, mask: Mask, cache) -> mx.array:
    """One mlx_lm transformer block (pre-norm attention + MLP) with explicit positions and mask."""
    h = h + self_attention(layer.self_attn, layer.input_layernorm(h), positions, mask, cache)
    return h + layer.mlp(layer.post_attention_layernorm(h))


def checkpointed_block(layer: nn.Module, h: mx.array, positions, mask: Mask, cache=None) -> mx.array:
    """block() under mx.checkpoint: parameters go in explicitly so their gradients flow (as mlx_lm does). A cache
    here can only be read (PrefixKV of a gated training forward's noised pass)."""

    def inner(params, h):
        layer.update(params)
        return block(layer, h, positions, mask, cache)

    return mx.checkpoint(inner)(layer.trainable_parameters(), h)


class PrefixKV:
    """A layer's keys and values of one pass, attended to by the next: in gated training the clean half runs first
    (base weights, no gradient) and stores here, then the noised half runs with keys = clean + its own."""

    offset = 0  # positions are always explicit in training

    def __init__(self, keys: Optional[mx.array] = None, values: Optional[mx.array] = None):
        self.kv = None if keys is None else (mx.stop_gradient(keys), mx.stop_gradient(values))

    def update_and_fetch(self, k: mx.array, v: mx.array):
        if self.kv is None:
            self.kv = (mx.stop_gradient(k), mx.stop_gradient(v))
            return k, v
        return mx.concatenate([self.kv[0], k], axis=2), mx.concatenate([self.kv[1], v], axis=2)


def self_attention(attn: nn.Module, x: mx.array, positions, mask: Mask, cache) -> mx.array:
    """One mlx_lm attention module run with explicit positions and mask. x: [B, T, dim] or [T, dim] (one sequence)."""
    B, T = (1, x.shape[0]) if x.ndim == 2 else x.shape[:2]
    q = attn.q_proj(x).reshape(B, T, attn.n_heads, -1)
    k = attn.k_proj(x).reshape(B, T, attn.n_kv_heads, -1)
    v = attn.v_proj(x).reshape(B, T, attn.n_kv_heads, -1)
    if hasattr(attn, "q_norm"):  # qwen3
        q, k = attn.q_norm(q), attn.k_norm(k)
    q, k, v = (t.transpose(0, 2, 1, 3) for t in (q, k, v))  # [B, H, T, D]
    offset = cache.offset if cache is not None else 0
    q, k = apply_rope(attn.rope, q, positions, offset), apply_rope(attn.rope, k, positions, offset)
    if cache is not None:
        k, v = cache.update_and_fetch(k, v)
    out = attention(q, k, v, attn.scale, mask)
    return attn.o_proj(out.transpose(0, 2, 1, 3).reshape(*x.shape[:-1], -1))


def apply_rope(rope: nn.Module, x: mx.array, positions: Optional[mx.array], offset: int) -> mx.array:
    """The module's own RoPE (default, linear, llama3 frequencies) at contiguous or arbitrary positions.

    x: [B, H, T, D]. positions (absolute) None means offset + 0..T-1. mx.fast.rope takes one offset per
    leading index, so for per-token positions every token becomes its own leading index:
    [B, H, T, D] -> [B*T, H, 1, D] with offsets positions.flatten().
    """
    if positions is None:
        return rope(x, offset=offset)
    B, H, T, D = x.shape
    flat = x.transpose(0, 2, 1, 3).reshape(B * T, H, 1, D)
    out = rope(flat, offset=positions.reshape(-1).astype(mx.int32))
    return out.reshape(B, T, H, D).transpose(0, 2, 1, 3)


def _mean_embedding(embed: nn.Module) -> mx.array:
    if isinstance(embed, nn.QuantizedEmbedding):
        w = mx.dequantize(embed.weight, embed.scales, embed.biases, embed.group_size, embed.bits)
    else:
        w = embed.weight
    return w.astype(mx.float32).mean(axis=0)
