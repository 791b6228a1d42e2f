"""`mlx-sbd fuse`: fold an SBD adapter into its base model, giving a standalone SBD model folder."""

import click


@click.command("fuse")
@click.option("--model", default=None, help="Base model (HF repo, folder or .gguf). Default: built-in SmolLM2-135M-Instruct.")
@click.option("--adapter-path", default="adapters", show_default=True, help="SBD adapter folder made by `mlx-sbd train`.")
@click.option("--save-path", default="fused_model", show_default=True, help="Folder to write the fused model to.")
@click.option("--dequantize", is_flag=True, help="Write float weights even when the base is quantized.")
@click.option("--overwrite", is_flag=True, help="Replace --save-path when it already holds files.")
def command(model, adapter_path, save_path, dequantize, overwrite):
    """Fuse an SBD adapter into the base model (loads with mlx_sbd.load, and with mlx_lm as a plain model)."""
    from ..fuse import fuse

    path = fuse(model, adapter_path, save_path, dequantize=dequantize, overwrite=overwrite)
    click.echo(f"Fused model written to {path}")
