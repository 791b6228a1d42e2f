"""`mlx-sbd`: one click entry point, one module per subcommand (cli/generate.py, cli/train.py, ...).

Flag names follow mlx_lm where the meaning is the same. Problems the user can fix (SBDError) print as one
line `Error: ...` with exit code 1; anything else keeps its traceback because it is a bug.
"""

import importlib

import click

from ..errors import SBDError

COMMANDS = ("generate", "train", "fuse", "convert", "server", "chat")


class SBDGroup(click.Group):
    def list_commands(self, ctx):
        return list(COMMANDS)

    def get_command(self, ctx, name):
        if name not in COMMANDS:
            return None
        return importlib.import_module(f"{__name__}.{name}").command

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except SBDError as e:
            raise click.ClickException(str(e)) from None


def load_for_decoding(model, adapter_path, no_adapter: bool, no_corpus: bool, dtype):
    """The model of a decoding command (generate, chat, server) as its --model / --adapter-path / --no-adapter /
    --no-corpus / --dtype flags ask."""
    from ..loading import load

    if no_adapter and adapter_path:
        raise click.UsageError("--no-adapter and --adapter-path exclude each other")
    sbd_model, tokenizer = load(model, adapter_path=False if no_adapter else adapter_path, dtype=dtype)
    if no_corpus:
        sbd_model.corpus = None
    return sbd_model, tokenizer


@click.group(cls=SBDGroup)
@click.version_option(package_name="mlx-sbd")
def cli():
    """Set Block Decoding for Llama/Qwen models with MLX: several tokens per forward pass."""


def main():
    from ..backend import preload_openblas_and_reexec

    preload_openblas_and_reexec()
    cli()
