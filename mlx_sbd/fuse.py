"""fuse(): base model + SBD adapter -> a standalone SBD model folder.

The LoRA layers are fused exactly as mlx_lm.fuse does (`module.fuse()` on every layer that has it) and the
folder is written with mlx_lm's save_model / save_config plus the tokenizer, so mlx_lm loads it as a plain
model. Beside the weights go `sbd.safetensors` (the mask embedding) and an "sbd" section in config.json
(model.SBDSettings), which loading.load_model picks up: mlx_sbd.load(folder) needs no adapter.
An existing, non-empty save folder is refused unless `overwrite`. The folder is written in a temp folder beside
it and renamed into place, so a failed or killed fuse never leaves a half-written (or half-replaced) model.
"""

import shutil
from pathlib import Path

import mlx.core as mx
from mlx_lm.utils import dequantize_model, load_config, save_config, save_model

from .adapter import SBD_WEIGHTS, fuse_lora, is_gated
from .errors import SBDError
from .gguf import make_temporary, remove_stale_temporaries, replace_folder
from .loading import load, resolve


def fuse(model_ref, adapter_path, save_path, dequantize: bool = False, overwrite: bool = False) -> Path:
    save_path = Path(save_path)
    base = resolve(model_ref)
    if save_path.resolve() == base.resolve():
        raise SBDError(f"--save-path {save_path} is the base model folder; choose a new folder")
    check_save_path(save_path, overwrite, base=base, adapter=adapter_path)
    model, tokenizer = load(base, adapter_path=adapter_path)  # fuses the LoRA over float weights
    if is_gated(model):
        raise SBDError(f"{adapter_path} is a gated adapter: its LoRA reaches the mask rows only, so it cannot be fused "
                       "into the weights; use it with --adapter-path (train with --ungated for a fusable one)")
    fuse_lora(model, quantized=True, dequantize=dequantize)  # and here also over quantized ones
    lm = model.lm
    config = load_config(base)
    if dequantize:
        lm = dequantize_model(lm)
        config.pop("quantization", None)
        config.pop("quantization_config", None)
    config["sbd"] = model.sbd.to_dict()
    save_path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(save_path.parent, save_path.name)  # what a killed fuse left here
    tmp = make_temporary(save_path)
    try:
        save_model(tmp, lm)
        save_config(config, config_path=tmp / "config.json")
        tokenizer.save_pretrained(str(tmp))
        mx.save_safetensors(str(tmp / SBD_WEIGHTS), {"mask_embedding": model.mask_embedding})
        tmp.chmod(0o755)  # mkdtemp makes it private; the result is an ordinary model folder
        replace_folder(tmp, save_path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return save_path


def check_save_path(save_path: Path, overwrite: bool, **inputs) -> None:
    """Refuse to replace a file, a non-empty folder (unless `overwrite`), or a folder holding one of `inputs`."""
    if save_path.exists() and not save_path.is_dir():
        raise SBDError(f"--save-path {save_path} is a file; choose a folder")
    if not (save_path.is_dir() and any(save_path.iterdir())):
        return
    if not overwrite:
        raise SBDError(f"--save-path {save_path} already exists and is not empty; pass --overwrite to replace it, "
                       "or choose another folder")
    for what, path in inputs.items():
        if path is not None and Path(path).exists() and Path(path).resolve().is_relative_to(save_path.resolve()):
            raise SBDError(f"--save-path {save_path} holds the {what} folder {path}; --overwrite would delete it, "
                           "choose another folder")
