"""`mlx-sbd convert`: a GGUF file (or, through mlx_lm, a Hugging Face model) -> an MLX model folder."""

from pathlib import Path
from typing import Optional

import click

from ..errors import SBDError


@click.command("convert")
@click.option("--gguf", "gguf_file", type=click.Path(dir_okay=False), help="Llama-architecture .gguf file to import.")
@click.option("--hf-path", "--model", "hf_path", help="Hugging Face repo or folder to convert with mlx_lm instead.")
@click.option("--mlx-path", required=True, type=click.Path(file_okay=False), help="Folder to write (must not exist).")
@click.option("--dequantize", "-d", is_flag=True, help="Write float weights instead of keeping them quantized.")
@click.option("--quantize", "-q", is_flag=True, help="With --hf-path: quantize (mlx_lm affine).")
@click.option("--q-bits", type=int, default=None, help="With -q: bits per weight (mlx_lm default 4).")
@click.option("--q-group-size", type=int, default=None, help="With -q: group size (mlx_lm default 64).")
def command(gguf_file, hf_path, mlx_path, dequantize, quantize, q_bits, q_group_size):
    """Write a model as a Hugging Face / MLX folder that mlx-sbd, mlx_lm and transformers load.

    \b
    From GGUF (llama architecture; F32, F16, Q8_0, Q4_0, Q4_1 tensors; byte-level BPE tokenizer):
      mlx-sbd convert --gguf SmolLM2-135M-Instruct.Q4_1.gguf --mlx-path smollm2
    Q8_0/Q4_0/Q4_1 tensors stay quantized (MLX affine, group size 32, no loss) unless --dequantize.
    From a Hugging Face model, delegated to mlx_lm.convert:
      mlx-sbd convert --hf-path HuggingFaceTB/SmolLM2-135M-Instruct -q --mlx-path smollm2-4bit
    """
    if bool(gguf_file) == bool(hf_path):
        raise SBDError("give exactly one of --gguf FILE or --hf-path MODEL")
    if gguf_file:
        if quantize:
            raise SBDError("-q applies to --hf-path; GGUF weights keep their quantization (or use --dequantize)")
        if not Path(gguf_file).is_file():
            raise SBDError(f"GGUF file not found: {gguf_file}")
        from ..gguf import convert

        out = convert(gguf_file, mlx_path, dequantize=dequantize)
    else:
        out = _convert_hf(hf_path, mlx_path, quantize, dequantize, q_bits, q_group_size)
    size = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    click.echo(f"Wrote {out} ({size / 1e6:.1f} MB)")


def _convert_hf(
    hf_path: str, mlx_path: str, quantize: bool, dequantize: bool, q_bits: Optional[int], q_group_size: Optional[int]
) -> Path:
    from mlx_lm.convert import convert

    try:
        convert(hf_path, mlx_path, quantize=quantize, dequantize=dequantize, q_bits=q_bits, q_group_size=q_group_size)
    except ValueError as e:  # existing --mlx-path, -q with -d, unknown model type
        raise SBDError(str(e).splitlines()[0]) from None
    return Path(mlx_path)
