"""SBD adapters: mlx_lm's adapter folder plus the mask embedding.

Folder layout (mlx_lm-compatible, so `mlx_lm.load(base, adapter_path=...)` still decodes plainly):
    adapters.safetensors   trainable weights of the mlx_lm model (LoRA/DoRA leaves, or all weights for full)
    adapter_config.json    mlx_lm's keys (fine_tune_type, num_layers, lora_parameters) + an "sbd" section:
                           block_size_max, mask="learned_embedding", base fingerprint, training settings
    sbd.safetensors        {"mask_embedding": [hidden]}
The "sbd" section is what model.SBDSettings reads (block_size_max, recommended block_size and gamma); load_adapter
sets `model.sbd` from it.
LoRA layers come from mlx_lm's tuner (linear_to_lora_layers / load_adapters); nothing here re-implements them.
"""

import json
import os
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.tuner.utils import linear_to_lora_layers, load_adapters

from .errors import SBDError
from .loading import SBD_WEIGHTS
from .model import SBDSettings

ADAPTER_WEIGHTS = "adapters.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
FINGERPRINT_KEYS = ("model_type", "hidden_size", "num_hidden_layers", "vocab_size")
FINE_TUNE_TYPES = ("lora", "dora", "full")


def fingerprint(model) -> dict:
    return {k: getattr(model.args, k) for k in FINGERPRINT_KEYS}


def make_trainable(model, fine_tune_type: str, num_layers: int, lora_parameters: dict) -> None:
    """Freeze the base, add mlx_lm LoRA/DoRA layers to the last `num_layers` blocks (-1: all), and train
    them together with the mask embedding; "full" trains every weight."""
    if fine_tune_type not in FINE_TUNE_TYPES:
        raise SBDError(f"unknown fine-tune type '{fine_tune_type}'; use one of {', '.join(FINE_TUNE_TYPES)}")
    if fine_tune_type == "full":
        model.unfreeze()
        return
    model.freeze()
    n = len(model.layers) if num_layers < 0 else num_layers
    linear_to_lora_layers(model.lm, n, lora_parameters, use_dora=fine_tune_type == "dora")
    model.unfreeze(keys=["mask_embedding"], recurse=False)


def save_adapter(model, path, config: dict) -> None:
    """Write the three adapter files; each one is replaced atomically (write beside, then rename)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = dict(config)
    config["sbd"] = {**config.get("sbd", {}), "mask": "learned_embedding", "base": fingerprint(model)}
    weights = dict(tree_flatten(model.lm.trainable_parameters()))
    _atomic(path / ADAPTER_WEIGHTS, lambda p: mx.save_safetensors(p, weights))
    _atomic(path / SBD_WEIGHTS, lambda p: mx.save_safetensors(p, {"mask_embedding": model.mask_embedding}))
    _atomic(path / ADAPTER_CONFIG, lambda p: Path(p).write_text(json.dumps(config, indent=2)))


def load_adapter(model, path) -> dict:
    """Apply an SBD adapter folder to `model` in place; returns its adapter_config."""
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
    # Adapter weights take the model's compute dtype whatever they were stored in (the shipped adapter is float16
    # to stay small; a float32 LoRA on a float16 model would silently promote every activation to float32).
    dtype = model.mask_embedding.dtype
    stored = set(mx.load(str(path / ADAPTER_WEIGHTS)))
    model.lm.load_weights([(k, v.astype(dtype)) for k, v in tree_flatten(model.lm.parameters())
                           if k in stored and mx.issubdtype(v.dtype, mx.floating) and v.dtype != dtype], strict=False)
    model.mask_embedding = mx.load(str(path / SBD_WEIGHTS))["mask_embedding"].astype(dtype)
    model.sbd = SBDSettings.from_dict(config.get("sbd", {}))
    return config


def fuse_lora(model, quantized: bool = False, dequantize: bool = False) -> None:
    """Fold LoRA/DoRA layers into plain Linear layers (mlx_lm's own `fuse`), so that a forward costs what the base
    model's does (unfused, every linear adds two small matmuls per forward). Layers over quantized weights are
    fused only with `quantized=True` (re-quantizing the sum loses accuracy, unless `dequantize`), as `mlx-sbd fuse`
    does; load() leaves them as they are."""
    fused = [(name, m.fuse(dequantize=dequantize)) for name, m in model.lm.named_modules()
             if hasattr(m, "fuse") and (quantized or not isinstance(getattr(m, "linear", None), nn.QuantizedLinear))]
    if fused:
        model.lm.update_modules(tree_unflatten(fused))


def _atomic(target: Path, write) -> None:
    # Keep the real suffix: mx.save_safetensors appends ".safetensors" to names that lack it.
    tmp = target.with_name(f".tmp-{target.name}")
    write(str(tmp))
    os.replace(tmp, target)
