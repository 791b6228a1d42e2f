"""load(): a model reference (HF folder, MLX-quantized folder, Hugging Face repo id, .gguf file, or nothing for
the built-in default) -> (SBDModel, tokenizer).

mlx_lm builds the model and tokenizer; this module only resolves the reference, checks what mlx-sbd supports,
normalises the config (transformers 5 nests RoPE settings under `rope_parameters`, which mlx_lm 0.32 ignores
for llama and qwen2), casts to the compute dtype, and attaches the SBD mask embedding and adapter.
Only safetensors are read: no pickle, no code from the model folder.
"""

import json
import struct
from pathlib import Path
from typing import Optional, Union

import mlx.core as mx
from mlx_lm.utils import load_model as mlx_lm_load_model
from mlx_lm.utils import load_tokenizer

from .adapter import SBD_WEIGHTS, fuse_lora, load_adapter, read_mask_embedding
from .backend import compute_dtype, warn_if_slow_blas
from .errors import SBDError
from .model import SUPPORTED_MODEL_TYPES, SUPPORTED_ROPE_TYPES, SBDModel, SBDSettings

# The SBD adapter trained for the built-in model (recipe: its README.md), applied by load() by default. It is gated:
# its LoRA reaches only mask rows, so verified decoding with it gives the base model's own output.
DEFAULT_ADAPTER = Path(__file__).parent / "adapters" / "smollm2-135m-instruct-sbd-gated"
# The paper's ungated adapter for it (LoRA on every row: its causal path is its own), shipped beside the default.
UNGATED_ADAPTER = Path(__file__).parent / "adapters" / "smollm2-135m-instruct-sbd"
HF_PATTERNS = ["*.json", "model*.safetensors", "tokenizer.model", "*.jinja", "*.txt"]


def load(
    ref: Optional[Union[str, Path]] = None,
    adapter_path: Union[str, Path, None, bool] = None,
    dtype: Optional[str] = None,
):
    """Load a Llama/Qwen model for SBD.

    `ref=None` is the built-in SmolLM2-135M-Instruct, and with it `adapter_path=None` applies the SBD adapter that
    ships with the package (DEFAULT_ADAPTER); `adapter_path=False` gives the plain model in every case.
    """
    path = resolve(ref)
    if adapter_path is None and ref is None and DEFAULT_ADAPTER.is_dir():
        adapter_path = DEFAULT_ADAPTER
    model = load_model(path, dtype=dtype)
    tokenizer = read_tokenizer(path)
    if adapter_path not in (None, False):
        load_adapter(model, adapter_path)
        fuse_lora(model)  # for decoding: base-model cost per forward (gated layers stay unfused: they must)
    return model, tokenizer


def resolve(ref: Optional[Union[str, Path]]) -> Path:
    """A local folder holding config.json + safetensors for any kind of reference."""
    if ref is None:
        from .gguf import default_model_path

        return default_model_path()
    p = Path(ref).expanduser()
    if p.suffix == ".gguf":
        if not p.is_file():
            raise SBDError(f"GGUF file not found: {p}")
        from .gguf import cached_folder

        return cached_folder(p)
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise SBDError(f"{p} has no config.json: not a Hugging Face / MLX model folder")
        return p
    if p.exists() or str(ref).startswith((".", "/", "~")) or str(ref).count("/") != 1:
        raise SBDError(f"model not found: {ref} (expected a model folder, a .gguf file or a Hugging Face repo id)")
    return _download(str(ref))


def _download(repo: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo, allow_patterns=HF_PATTERNS))
    except Exception as e:  # offline, unknown repo, gated repo: all end the same way for the user
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SBDError(
            f"could not get '{repo}' from the Hugging Face Hub ({type(e).__name__}: {reason}). "
            "Check the repo id and your network, or pass a local folder or .gguf file."
        ) from None


def load_model(path: Union[str, Path], dtype: Optional[str] = None) -> SBDModel:
    """Model only, from a local folder (see resolve)."""
    path = Path(path)
    config = _read_config(path)
    overrides = check_config(config, path)
    for f in sorted(path.glob("model*.safetensors")):
        check_safetensors(f)
    try:
        lm, _ = mlx_lm_load_model(path, model_config=overrides)
    except FileNotFoundError:
        raise SBDError(f"no model*.safetensors weights in {path}") from None
    except (ValueError, RuntimeError) as e:
        raise SBDError(f"could not load the weights in {path}: {e}") from None
    target = compute_dtype(dtype)
    if target is not None:
        lm.set_dtype(target)
    mask_embedding, sbd = None, None
    if (path / SBD_WEIGHTS).is_file():  # a fused SBD model
        mask_embedding = read_mask_embedding(path)
        sbd = SBDSettings.from_dict(config.get("sbd", {}))
    warn_if_slow_blas()
    return SBDModel(lm, mask_embedding, sbd)


def _read_config(path: Path) -> dict:
    try:
        return json.loads((path / "config.json").read_text())
    except FileNotFoundError:
        raise SBDError(f"{path} has no config.json: not a Hugging Face / MLX model folder") from None
    except json.JSONDecodeError as e:
        raise SBDError(f"{path / 'config.json'} is not valid JSON: {e}") from None


def check_config(config: dict, path: Path) -> dict:
    """Reject what mlx-sbd cannot run; return config overrides that make mlx_lm build the right model."""
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise SBDError(
            f"unsupported model_type '{model_type}' in {path / 'config.json'}; "
            f"mlx-sbd supports {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    overrides = {}
    params = config.get("rope_parameters")
    if params:  # transformers >= 5: {"rope_theta": ..., "rope_type": ..., <scaling keys>}
        overrides["rope_theta"] = params.get("rope_theta", config.get("rope_theta"))
        is_default = params.get("rope_type", params.get("type", "default")) == "default"
        overrides["rope_scaling"] = None if is_default else dict(params)
    scaling = overrides.get("rope_scaling", config.get("rope_scaling"))
    rope_type = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise SBDError(f"unsupported RoPE type '{rope_type}'; mlx-sbd supports {', '.join(SUPPORTED_ROPE_TYPES)}")
    return {k: v for k, v in overrides.items() if v is not None or k == "rope_scaling"}


def check_safetensors(path: Path) -> None:
    """Cheap integrity check (header parses, file as long as the header says) that names the bad file."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > size:
                raise ValueError("header larger than file")
            header = json.loads(f.read(n))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    except (struct.error, ValueError, KeyError, TypeError):
        raise SBDError(f"{path} is not a valid safetensors file (corrupt header); re-download or re-convert it") from None
    if 8 + n + end > size:
        raise SBDError(f"{path} is truncated ({size} bytes, header needs {8 + n + end}); re-download or re-convert it")


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json", "tiktoken.model")


def check_tokenizer_files(path: Path) -> None:
    if not any((path / name).is_file() for name in TOKENIZER_FILES) and not any(path.glob("*.tiktoken")):
        raise SBDError(f"{path} has no tokenizer (no tokenizer.json, tokenizer.model or tokenizer_config.json); "
                       "copy the tokenizer files of the original model into it")


def read_tokenizer(path: Path):
    """mlx_lm's tokenizer for a model folder; one that transformers cannot build is an SBDError naming the folder."""
    check_tokenizer_files(path)
    try:
        return load_tokenizer(path, eos_token_ids=_read_config(path).get("eos_token_id"))
    except (ValueError, OSError) as e:  # incl. JSONDecodeError: a broken tokenizer.json
        reason = " ".join(str(e).split()) or type(e).__name__
        raise SBDError(f"could not load the tokenizer in {path} ({reason[:200]}); copy the tokenizer files of the "
                       "original model into it") from None
