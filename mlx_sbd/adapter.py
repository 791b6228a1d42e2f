"""SBD adapters, in one home: the folder format, the mask embedding, gated LoRA, loading, saving and fusing.

Folder layout (mlx_lm-compatible names and keys):
    adapters.safetensors   trainable weights of the mlx_lm model (LoRA/DoRA leaves, or all weights for full)
    adapter_config.json    mlx_lm's keys (fine_tune_type, num_layers, lora_parameters), "gated", and an "sbd"
                           section: block_size_max, recommended block_size and gamma, mask="learned_embedding",
                           base fingerprint, training settings, and the save id of the two weight files
    sbd.safetensors        {"mask_embedding": [hidden]}
    corpus.npz             optional: the base model's own answers that lookup drafts come from (corpus.Corpus; the
                           self-distillation answers the adapter was trained on), loaded into `model.corpus`
The "sbd" section is what model.SBDSettings reads; load_adapter sets `model.sbd` from it.

Gated adapters (VERIFIED_SBD.md §1, the default for new LoRA/DoRA runs): y = W x + g(row) * s * B A x, with g = 1
on mask-block rows and 0 on every other row. Mask rows always come last in a forward (the noised half in training,
the mask block in decoding), so the gate is one number, how many trailing rows are mask rows, which
SBDModel.forward sets for the duration of a forward (`mask_rows`). The causal rows then run the base weights
exactly: the KV cache is the base model's own and `model(tokens)` is the base model. A gated adapter cannot be
fused into the weights. mlx_lm would load its folder as an ordinary (ungated) LoRA: it is an mlx-sbd adapter.

LoRA layers come from mlx_lm's tuner (linear_to_lora_layers / load_adapters); gating subclasses its layers.
"""

import json
import os
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.tuner.dora import DoRALinear
from mlx_lm.tuner.lora import LoRALinear
from mlx_lm.tuner.utils import linear_to_lora_layers, load_adapters

from .corpus import CORPUS_FILE, Corpus
from .errors import SBDError
from .model import SBDSettings

ADAPTER_WEIGHTS = "adapters.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
SBD_WEIGHTS = "sbd.safetensors"  # the mask embedding, in an adapter folder and in a fused model folder
FINGERPRINT_KEYS = ("model_type", "hidden_size", "num_hidden_layers", "vocab_size")
FINE_TUNE_TYPES = ("lora", "dora", "full")


# --- gated LoRA --------------------------------------------------------------------------------------------
class GatedLoRALinear(LoRALinear):
    """mlx_lm's LoRALinear whose low-rank delta reaches only the last `gate.rows` rows."""

    def __call__(self, x):
        n, T = min(self.gate.rows, x.shape[-2]), x.shape[-2]
        y = self.linear(x)
        if n == 0:
            return y
        # Few ops, not few flops: the rank-r product runs on every row of the input with its causal rows zeroed
        # (once for the projections that share it), and addmm adds it in. Slicing the mask rows out and
        # concatenating them back cost twice the ops (a forward has one such layer per projection per block, and
        # on small models every op's dispatch shows).
        xa = self.dropout(x if n == T else self.gate.masked(x)) @ self.lora_a
        if xa.dtype != y.dtype:  # a half-precision base: add the product in float32, then cast (mlx_lm's rounding)
            return y + (self.scale * (xa @ self.lora_b)).astype(y.dtype)
        return mx.addmm(y, xa, self.lora_b, alpha=self.scale)


class GatedDoRALinear(DoRALinear):
    """mlx_lm's DoRALinear on the last `gate.rows` rows, the plain base linear on the others."""

    def __call__(self, x):
        n, T = min(self.gate.rows, x.shape[-2]), x.shape[-2]
        if n == 0:
            return self.linear(x)
        if n == T:
            return super().__call__(x)
        return mx.concatenate([self.linear(x[..., : T - n, :]), super().__call__(x[..., T - n :, :])], axis=-2)


GATED = {LoRALinear: GatedLoRALinear, DoRALinear: GatedDoRALinear}


def gate_lora_layers(model) -> None:
    """Turn every mlx_lm LoRA/DoRA layer of `model.lm` into its gated form, sharing `model.gate`. Parameters and
    their names are unchanged (same adapters.safetensors keys as mlx_lm's)."""
    gated = []
    for name, m in model.lm.named_modules():
        cls = GATED.get(type(m))
        if cls is None:
            continue
        g = cls.__new__(cls)  # the same module with the gated __call__: same children, arrays and attributes
        dict.update(g, m)
        g.__dict__.update(m.__dict__)
        g.gate = model.gate
        gated.append((name, g))
    if gated:
        model.lm.update_modules(tree_unflatten(gated))


def gated_layers(model) -> list:
    """[(name, layer)] of every gated LoRA/DoRA layer of `model.lm`."""
    return [(name, m) for name, m in model.lm.named_modules() if isinstance(m, tuple(GATED.values()))]


def is_gated(model) -> bool:
    return bool(gated_layers(model))


@contextmanager
def base_layers(model):
    """Within: `model.lm` with every gated layer replaced by its base linear, the same weight arrays (the base model
    as mlx_lm would load it, for a baseline timed in the same memory; each idle gated layer costs a Python call per
    forward, ~0.4 ms of SmolLM2's ~60 ms on these CPUs). Its gated layers are back after."""
    gated = gated_layers(model)
    if gated:
        model.lm.update_modules(tree_unflatten([(name, m.linear) for name, m in gated]))
    try:
        yield model.lm
    finally:
        if gated:
            model.lm.update_modules(tree_unflatten(gated))


# --- training set-up -----------------------------------------------------------------------------------------
def fingerprint(model) -> dict:
    return {k: getattr(model.args, k) for k in FINGERPRINT_KEYS}


def make_trainable(model, fine_tune_type: str, num_layers: int, lora_parameters: dict, gated: bool = False) -> None:
    """Freeze the base, add mlx_lm LoRA/DoRA layers (gated ones with `gated`) to the last `num_layers` blocks
    (-1: all), and train them together with the mask embedding; "full" trains every weight."""
    if fine_tune_type not in FINE_TUNE_TYPES:
        raise SBDError(f"unknown fine-tune type '{fine_tune_type}'; use one of {', '.join(FINE_TUNE_TYPES)}")
    if fine_tune_type == "full":
        if gated:
            raise SBDError("a full fine-tune cannot be gated (gating applies LoRA deltas); pass --ungated")
        model.unfreeze()
        return
    model.freeze()
    n = len(model.layers) if num_layers < 0 else num_layers
    linear_to_lora_layers(model.lm, n, lora_parameters, use_dora=fine_tune_type == "dora")
    if gated:
        gate_lora_layers(model)
    model.unfreeze(keys=["mask_embedding"], recurse=False)


# --- the folder ----------------------------------------------------------------------------------------------
def save_adapter(model, path, config: dict) -> None:
    """Write the three adapter files. Each is replaced atomically (write beside, then rename), and the two weight
    files carry a fresh save id that the config, written last, records: a write killed half-way leaves files whose
    ids disagree, which load_adapter refuses instead of mixing weights of two steps."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_id = uuid.uuid4().hex
    config = dict(config)
    config["sbd"] = {**config.get("sbd", {}), "mask": "learned_embedding", "base": fingerprint(model),
                     "save_id": save_id}
    weights = dict(tree_flatten(model.lm.trainable_parameters()))
    meta = {"save_id": save_id}
    _atomic(path / ADAPTER_WEIGHTS, lambda p: mx.save_safetensors(p, weights, metadata=meta))
    _atomic(path / SBD_WEIGHTS,
            lambda p: mx.save_safetensors(p, {"mask_embedding": model.mask_embedding}, metadata=meta))
    _atomic(path / ADAPTER_CONFIG, lambda p: Path(p).write_text(json.dumps(config, indent=2)))


def copy_adapter(src, dest, dtype=None, sbd: dict = None) -> None:
    """Copy an adapter folder's three files (and its corpus, if any) to `dest` (as one new save), weights cast to
    `dtype` when given and the "sbd" section updated with `sbd` (scripts/ship_adapter.py: the built-in adapter ships in
    float16)."""
    src, dest = Path(src), Path(dest)
    config = read_adapter_config(src)
    config["sbd"] = {**config.get("sbd", {}), **(sbd or {}), "save_id": uuid.uuid4().hex}
    meta = {"save_id": config["sbd"]["save_id"]}
    weights = _read_weights(src / ADAPTER_WEIGHTS)[0]
    if dtype is not None:
        weights = {k: v.astype(dtype) for k, v in weights.items()}
    dest.mkdir(parents=True, exist_ok=True)
    _atomic(dest / ADAPTER_WEIGHTS, lambda p: mx.save_safetensors(p, weights, metadata=meta))
    _atomic(dest / SBD_WEIGHTS, lambda p: mx.save_safetensors(p, _read_weights(src / SBD_WEIGHTS)[0], metadata=meta))
    _atomic(dest / ADAPTER_CONFIG, lambda p: Path(p).write_text(json.dumps(config, indent=2) + "\n"))
    if (src / CORPUS_FILE).is_file():
        _atomic(dest / CORPUS_FILE, lambda p: shutil.copyfile(src / CORPUS_FILE, p))


def save_corpus(path, corpus: Corpus) -> None:
    """Write a draft corpus (the model's own answers, corpus.Corpus) into an adapter folder, where load_adapter
    finds it."""
    _atomic(Path(path) / CORPUS_FILE, corpus.save)


def record_draft_acceptance(path, rates) -> None:
    """Write the drafts' measured acceptance per position (heldout.measure) into the adapter's "sbd" section, where
    --draft auto reads its starting estimate (SBDSettings.draft_acceptance). The weights are not touched."""
    path = Path(path)
    config = read_adapter_config(path)
    config["sbd"] = {**config.get("sbd", {}), "draft_acceptance": [float(r) for r in rates] or None}
    _atomic(path / ADAPTER_CONFIG, lambda p: Path(p).write_text(json.dumps(config, indent=2) + "\n"))


def read_adapter_config(path) -> dict:
    """adapter_config.json of an adapter folder, checked to be a complete, consistent mlx-sbd adapter."""
    path = Path(path)
    if not path.is_dir():
        raise SBDError(f"adapter folder not found: {path}")
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS, SBD_WEIGHTS):
        if not (path / name).is_file():
            raise SBDError(f"{path} has no {name}: not an mlx-sbd adapter folder (train one with `mlx-sbd train`)")
    try:
        config = json.loads((path / ADAPTER_CONFIG).read_text())
    except json.JSONDecodeError as e:
        raise SBDError(f"{path / ADAPTER_CONFIG} is not valid JSON: {e}") from None
    expected = config.get("sbd", {}).get("save_id")
    for name in (ADAPTER_WEIGHTS, SBD_WEIGHTS):
        found = _read_weights(path / name)[1].get("save_id")
        if expected is not None and found != expected:
            raise SBDError(f"{path / name} is from another save than {ADAPTER_CONFIG} (a write was interrupted); "
                           f"copy the adapter files of the last complete checkpoint in {path / 'checkpoints'} here")
    return config


def load_adapter(model, path) -> dict:
    """Apply an SBD adapter folder to `model` in place (gated layers if the adapter is gated); returns its config."""
    path = Path(path)
    config = read_adapter_config(path)
    expected = config.get("sbd", {}).get("base")
    if expected is not None and expected != fingerprint(model):
        raise SBDError(
            f"adapter {path} was trained for a different base model ({expected}), not this one "
            f"({fingerprint(model)}); pass the base model it was trained on"
        )
    try:
        load_adapters(model.lm, str(path))
    except (ValueError, KeyError) as e:
        raise SBDError(f"adapter {path} does not fit this model: {e}") from None
    if config.get("gated"):
        gate_lora_layers(model)
    # Adapter weights take the model's compute dtype whatever they were stored in (the shipped adapter is float16
    # to stay small; a float32 LoRA on a float16 model would silently promote every activation to float32).
    dtype = model.mask_embedding.dtype
    stored = set(_read_weights(path / ADAPTER_WEIGHTS)[0])
    model.lm.load_weights([(k, v.astype(dtype)) for k, v in tree_flatten(model.lm.parameters())
                           if k in stored and mx.issubdtype(v.dtype, mx.floating) and v.dtype != dtype], strict=False)
    model.mask_embedding = read_mask_embedding(path).astype(dtype)
    model.sbd = SBDSettings.from_dict(config.get("sbd", {}))
    model.corpus = Corpus.load(path / CORPUS_FILE) if (path / CORPUS_FILE).is_file() else None
    return config


def load_adapter_weights(model, path, what: str) -> None:
    """Put the trainable weights and mask embedding saved in `path` (an adapter folder or a checkpoint) into a
    training run's model: every stored weight must be a trainable parameter of this run with the same shape (same
    fine-tune type, LoRA rank and layers). Weights take the model's dtype (a shipped adapter is float16). A gated
    run may start from an ungated adapter's weights and the other way round: the parameters are the same."""
    path = Path(path)
    for name in (ADAPTER_WEIGHTS, SBD_WEIGHTS):
        if not (path / name).is_file():
            raise SBDError(f"{what}: no {name} there (expected an mlx-sbd adapter folder)")
    ours = dict(tree_flatten(model.lm.trainable_parameters()))
    theirs = _read_weights(path / ADAPTER_WEIGHTS)[0]
    bad = sorted(k for k, v in theirs.items() if k not in ours or ours[k].shape != v.shape)
    if bad or len(theirs) != len(ours):
        raise SBDError(f"{what} does not match this run's trainable weights ({len(bad)} unknown or "
                       f"reshaped, e.g. {bad[:2]}; {len(ours)} here vs {len(theirs)} there): use the same "
                       "fine_tune_type, num_layers and lora_parameters as the run that made it")
    model.lm.load_weights([(k, v.astype(ours[k].dtype)) for k, v in theirs.items()], strict=False)
    model.mask_embedding = read_mask_embedding(path).astype(model.mask_embedding.dtype)


def read_mask_embedding(folder) -> mx.array:
    """The mask embedding of an adapter folder or a fused model folder (its sbd.safetensors)."""
    weights = _read_weights(Path(folder) / SBD_WEIGHTS)[0]
    if "mask_embedding" not in weights:
        raise SBDError(f"{Path(folder) / SBD_WEIGHTS} has no mask_embedding")
    return weights["mask_embedding"]


def fuse_lora(model, quantized: bool = False, dequantize: bool = False) -> None:
    """Fold LoRA/DoRA layers into plain Linear layers (mlx_lm's own `fuse`), so that a forward costs what the base
    model's does (unfused, every linear adds two small matmuls per forward). Layers over quantized weights are
    fused only with `quantized=True` (re-quantizing the sum loses accuracy, unless `dequantize`), as `mlx-sbd fuse`
    does; load() leaves them as they are. Gated layers are never fused: their delta reaches the mask rows only."""
    fused = [(name, m.fuse(dequantize=dequantize)) for name, m in model.lm.named_modules()
             if hasattr(m, "fuse") and not isinstance(m, tuple(GATED.values()))
             and (quantized or not isinstance(getattr(m, "linear", None), nn.QuantizedLinear))]
    if fused:
        model.lm.update_modules(tree_unflatten(fused))


def _read_weights(path: Path):
    """(arrays, metadata) of a safetensors file, with a one-line error for a truncated or corrupt one."""
    try:
        return mx.load(str(path), return_metadata=True)
    except (RuntimeError, ValueError, OSError) as e:
        raise SBDError(f"{path} is not a readable safetensors file ({e}); re-train or re-copy the adapter") from None


def _atomic(target: Path, write) -> None:
    # Keep the real suffix: mx.save_safetensors appends ".safetensors" to names that lack it.
    tmp = target.with_name(f".tmp-{target.name}")
    write(str(tmp))
    os.replace(tmp, target)
