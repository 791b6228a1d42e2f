"""`mlx-sbd generate`: decode a prompt with SBD (or one token per forward with --block-size 1)."""

import sys

import click

from ..samplers import SELECTORS


@click.command("generate")
@click.option("--model", default=None, help="HF repo, model folder or .gguf file. Default: built-in SmolLM2-135M-Instruct.")
@click.option("--adapter-path", default=None, help="SBD adapter folder made by `mlx-sbd train`. Default: the adapter shipped for the built-in model.")
@click.option("--no-adapter", is_flag=True, help="Use the model without any adapter (the plain base).")
@click.option("--prompt", "-p", default="Hello", show_default=True, help="The prompt; '-' reads it from stdin.")
@click.option("--max-tokens", "-m", default=256, show_default=True, type=int, help="Most tokens to generate.")
@click.option(
    "--block-size", "-k", default=None, type=int,
    help="Tokens per block (1 = plain next-token decoding). Default: the adapter's recommendation; 1 for models not trained for SBD.",
)
@click.option("--gamma", default=None, type=float, help="EB-Sampler error budget (0 = one token per forward). Default: the adapter's, else 0.1.")
@click.option("--sampler", default="entropy", show_default=True, type=click.Choice(sorted(SELECTORS)), help="Which masked positions to reveal each forward.")
@click.option("--ntp-first/--masked-first", default=True, show_default=True, help="Each block's first open token from the causal (next-token) prediction, or from its mask as in the paper.")
@click.option("--temp", default=0.0, show_default=True, type=float, help="Sampling temperature (0 = argmax).")
@click.option("--top-p", default=1.0, show_default=True, type=float, help="Nucleus sampling threshold.")
@click.option("--top-k", default=0, show_default=True, type=int, help="Top-k sampling (0 = off).")
@click.option("--seed", default=None, type=int, help="Random seed for sampling.")
@click.option("--stop", multiple=True, help="Stop when this text appears (repeatable).")
@click.option("--system-prompt", default=None, help="System message for chat models.")
@click.option("--ignore-chat-template", is_flag=True, help="Feed the prompt as raw text.")
@click.option("--dtype", default=None, type=click.Choice(["float32", "float16", "bfloat16"]), help="Compute dtype. Default: float32 on CPU, the checkpoint's on Metal.")
@click.option("--verbose/--quiet", default=True, show_default=True, help="Print statistics after the text.")
def command(model, adapter_path, no_adapter, prompt, max_tokens, block_size, gamma, sampler, ntp_first, temp, top_p, top_k, seed,
            stop, system_prompt, ignore_chat_template, dtype, verbose):
    """Generate text several tokens per forward pass with Set Block Decoding."""
    import mlx.core as mx

    from ..generate import default_settings, format_stats, stream_generate
    from ..loading import load

    if prompt == "-":
        prompt = sys.stdin.read()
    if seed is not None:
        mx.random.seed(seed)
    if no_adapter and adapter_path:
        raise click.UsageError("--no-adapter and --adapter-path exclude each other")
    sbd_model, tokenizer = load(model, adapter_path=False if no_adapter else adapter_path, dtype=dtype)
    if block_size is None and sbd_model.sbd is None and verbose:
        click.echo("Note: this model has no SBD adapter; decoding one token per forward (use --block-size to force SBD).", err=True)
    block_size, gamma = default_settings(sbd_model, block_size, gamma)
    last = None
    for last in stream_generate(
        sbd_model, tokenizer, prompt, max_tokens=max_tokens, block_size=block_size, gamma=gamma, sampler=sampler,
        temp=temp, top_p=top_p, top_k=top_k, stop=stop, system_prompt=system_prompt,
        chat_template=False if ignore_chat_template else None, ntp_first=ntp_first,
    ):
        click.echo(last.text, nl=False)
    click.echo()
    if verbose and last is not None:
        click.echo(format_stats(last) + f"\nBlock size: {block_size}, gamma: {gamma}, sampler: {sampler}", err=True)
