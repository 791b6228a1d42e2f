"""Tiny llama-family models with a character-level tokenizer, written as normal model folders.

Used by tests and by the small-scale benchmarks: a folder made here loads with mlx_sbd.load and mlx_lm.load
like any Hugging Face checkpoint (config.json, model.safetensors, tokenizer.json, tokenizer_config.json).
"""

import json
import string
from pathlib import Path
from typing import Optional, Sequence

import mlx.core as mx
from mlx.utils import tree_flatten
from mlx_lm.utils import _get_classes

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]
DEFAULT_ALPHABET = string.digits + string.ascii_letters + " +-*=:,.;?!()[]<>#|/\n"


def write_char_tokenizer(folder: Path, alphabet: str = DEFAULT_ALPHABET) -> int:
    """One token per character plus specials; returns the vocab size. No chat template (plain-text prompts)."""
    from tokenizers import Tokenizer, decoders, models

    chars = sorted(set(alphabet))
    vocab = {tok: i for i, tok in enumerate(SPECIALS + chars)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(SPECIALS)
    tok.save(str(folder / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "pad_token": "<pad>",
        "unk_token": "<unk>",
        "add_bos_token": False,
        "model_max_length": 4096,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return len(vocab)


def make_tiny_model(
    folder,
    model_type: str = "llama",
    hidden_size: int = 128,
    num_hidden_layers: int = 4,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 2,
    intermediate_size: int = 256,
    max_position_embeddings: int = 1024,
    alphabet: str = DEFAULT_ALPHABET,
    tie_word_embeddings: bool = True,
    seed: int = 0,
    extra_config: Optional[dict] = None,
) -> Path:
    """Write a randomly initialised model folder (float32) and return its path."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab_size = write_char_tokenizer(folder, alphabet)
    config = {
        "model_type": model_type,
        "architectures": [{"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}[model_type]],
        "hidden_size": hidden_size,
        "num_hidden_layers": num_hidden_layers,
        "num_attention_heads": num_attention_heads,
        "num_key_value_heads": num_key_value_heads,
        "intermediate_size": intermediate_size,
        "head_dim": hidden_size // num_attention_heads,
        "max_position_embeddings": max_position_embeddings,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "vocab_size": vocab_size,
        "tie_word_embeddings": tie_word_embeddings,
        "bos_token_id": SPECIALS.index("<s>"),
        "eos_token_id": SPECIALS.index("</s>"),
        "pad_token_id": SPECIALS.index("<pad>"),
        **(extra_config or {}),
    }
    mx.random.seed(seed)
    model_cls, args_cls = _get_classes(config)
    model = model_cls(args_cls.from_dict(config))
    weights = dict(tree_flatten(model.parameters()))
    mx.save_safetensors(str(folder / "model.safetensors"), weights)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder


def encode(tokenizer, text: str) -> Sequence[int]:
    return tokenizer.encode(text, add_special_tokens=False)
