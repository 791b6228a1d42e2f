"""fuse(): base model + SBD adapter -> a standalone SBD model folder.

The LoRA layers are fused exactly as mlx_lm.fuse does (`module.fuse()` on every layer that has it) and the
folder is written with mlx_lm's save_model / save_config plus the tokenizer, so mlx_lm loads it as a plain
model. Beside the weights go `sbd.safetensors` (the mask embedding) and an "sbd" section in config.json
(model.SBDSettings), which loading.load_model picks up: mlx_sbd.load(folder) needs no adapter.
"""

from pathlib import Path

import mlx.core as mx
from mlx_lm.utils import dequantize_model, load_config, save_config, save_model

from .adapter import fuse_lora
from .errors import SBDError
from .loading import SBD_WEIGHTS, load, resolve


def fuse(model_ref, adapter_path, save_path, dequantize: bool = False) -> Path:
    save_path = Path(save_path)
    base = resolve(model_ref)
    if save_path.resolve() == base.resolve():
        raise SBDError(f"--save-path {save_path} is the base model folder; choose a new folder")
    model, tokenizer = load(base, adapter_path=adapter_path)  # fuses the LoRA over float weights
    fuse_lora(model, quantized=True, dequantize=dequantize)  # and here also over quantized ones
    lm = model.lm
    config = load_config(base)
    if dequantize:
        lm = dequantize_model(lm)
        config.pop("quantization", None)
        config.pop("quantization_config", None)
    config["sbd"] = model.sbd.to_dict()
    save_model(save_path, lm)
    save_config(config, config_path=save_path / "config.json")
    tokenizer.save_pretrained(str(save_path))
    mx.save_safetensors(str(save_path / SBD_WEIGHTS), {"mask_embedding": model.mask_embedding})
    return save_path
