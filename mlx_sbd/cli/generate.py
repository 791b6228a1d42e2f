"""`mlx-sbd generate`: decode a prompt with SBD (or one token per forward with --block-size 1)."""

import os
import sys

import click

from ..drafting import DRAFTS, LAYOUTS, parse_branch
from ..samplers import SELECTORS, make_token_sampler


@click.command("generate")
@click.option("--model", default=None, help="HF repo, model folder or .gguf file. Default: built-in SmolLM2-135M-Instruct.")
@click.option("--adapter-path", default=None, help="SBD adapter folder made by `mlx-sbd train`. Default: the adapter shipped for the built-in model.")
@click.option("--no-adapter", is_flag=True, help="Use the model without any adapter (the plain base).")
@click.option("--no-corpus", is_flag=True, help="Leave out the adapter's draft corpus (the model's own earlier answers that lookup drafts come from; the built-in adapter has one).")
@click.option("--prompt", "-p", default="Hello", show_default=True, help="The prompt; '-' reads it from stdin.")
@click.option("--max-tokens", "-m", default=256, show_default=True, type=int, help="Most tokens to generate.")
@click.option(
    "--block-size", "-k", default=None, type=int,
    help="Tokens per block (1 = plain next-token decoding). Default: the adapter's recommendation; 1 for models not trained for SBD.",
)
@click.option("--gamma", default=None, type=float, help="Entropy budget (nats): of the drafts proposed per forward (verified), or of what a forward reveals (--lossy; 0 = one token per forward). Default: inf with --draft auto (all of the mask block's guesses offered; auto sends the ones that pay), else the adapter's, else 0.1.")
@click.option("--lossy", is_flag=True, help="The paper's loop: write the masked guesses straight into the answer (faster with a strong adapter, but the output is no longer the model's own). Default: verified decoding, lossless.")
@click.option("--draft", default="auto", show_default=True, type=click.Choice(list(DRAFTS)), help="Where verified decoding's drafts come from: sbd (the adapter's mask block), lookup (n-grams of the prompt and answer: any model, no adapter; where they have none, the adapter's corpus of the model's own answers, if it has one), both, none (one token per forward), auto (chosen per forward from the measured cost of rows and the acceptance seen; the mask block only with an SBD adapter).")
@click.option("--layout", default="auto", show_default=True, type=click.Choice(list(LAYOUTS)), help="Verified forwards with the mask block: linear (one block after the drafts), predraft (one after each draft: the next drafts exist whatever passes, more rows), auto (--draft auto chooses from measured costs; fixed --draft modes use linear).")
@click.option("--branch", default=None, callback=lambda ctx, param, v: parse_branch(v), help="Branch rows per verified forward: the mask block's next-best guesses beside its drafts, each a causal row; when the verifier rejects a draft and its token is that guess, the branch row's next token is the next forward's first draft. N (the likeliest N rows), or auto (--draft auto chooses per forward from the measured cost of rows). Default: auto on a GPU, none on the CPU back-end (measured to cost more than it gains there).")
@click.option("--selector", "--sampler", "selector", default="entropy", show_default=True, type=click.Choice(sorted(SELECTORS)), help="--lossy: which masked positions to reveal each forward.")
@click.option("--ntp-first/--masked-first", default=True, show_default=True, help="--lossy: each block's first open token from the causal (next-token) prediction, or from its mask as in the paper.")
@click.option("--temp", default=0.0, show_default=True, type=float, help="Sampling temperature (0 = argmax).")
@click.option("--top-p", default=1.0, show_default=True, type=float, help="Nucleus sampling threshold.")
@click.option("--top-k", default=0, show_default=True, type=int, help="Top-k sampling (0 = off).")
@click.option("--seed", default=None, type=int, help="Random seed for sampling.")
@click.option("--stop", multiple=True, help="Stop when this text appears (repeatable).")
@click.option("--system-prompt", default=None, help="System message for chat models.")
@click.option("--ignore-chat-template", is_flag=True, help="Feed the prompt as raw text.")
@click.option("--dtype", default=None, type=click.Choice(["float32", "float16", "bfloat16"]), help="Compute dtype. Default: float32 on CPU, the checkpoint's on Metal.")
@click.option("--verbose/--quiet", default=True, show_default=True, help="Print statistics after the text.")
def command(model, adapter_path, no_adapter, no_corpus, prompt, max_tokens, block_size, gamma, lossy, draft, layout, branch, selector, ntp_first, temp, top_p, top_k, seed,
            stop, system_prompt, ignore_chat_template, dtype, verbose):
    """Generate text several tokens per forward pass with Set Block Decoding."""

    from ..drafting import resolve_draft
    from ..generate import default_settings, format_stats, stream_generate
    from . import load_for_decoding

    prompt = read_prompt(prompt)
    make_token_sampler(temp, top_p, top_k)  # the sampling flags are checked before the model loads
    sbd_model, tokenizer = load_for_decoding(model, adapter_path, no_adapter, no_corpus, dtype)
    source = resolve_draft(draft, block_size, not lossy)
    block_size, gamma = default_settings(sbd_model, block_size, gamma, source)
    if source == "auto":
        source = "auto (prompt lookup" + (", the corpus" if sbd_model.corpus is not None else "") + (
            " and the mask block)" if sbd_model.sbd is not None else ")")
        if sbd_model.sbd is None and verbose:
            click.echo("Note: this model has no SBD adapter; drafting from the text's own n-grams (prompt lookup).", err=True)
    trained = sbd_model.sbd.block_size_max if sbd_model.sbd is not None else None
    if trained is not None and isinstance(block_size, int) and block_size > trained:
        click.echo(f"Warning: --block-size {block_size} is above the largest block this model's SBD training used "
                   f"({trained}), so its guesses degrade; use --block-size {trained} or less.", err=True)
    last = None
    for last in stream_generate(
        sbd_model, tokenizer, prompt, max_tokens=max_tokens, block_size=block_size, gamma=gamma, selector=selector,
        temp=temp, top_p=top_p, top_k=top_k, stop=stop, system_prompt=system_prompt,
        chat_template=False if ignore_chat_template else None, ntp_first=ntp_first,
        verify=not lossy, seed=seed, draft=draft, layout=layout, branch=branch,
    ):
        click.echo(last.text, nl=False)
    click.echo()
    if verbose and last is not None:
        mode = f"lossy, selector: {selector}" if lossy else f"verified (lossless), drafts: {source}"
        click.echo(format_stats(last) + f"\nBlock size: {block_size}, gamma: {gamma}, decoding: {mode}", err=True)


def read_prompt(prompt: str) -> str:
    """The prompt text ('-': all of stdin). Bytes that are not UTF-8, on stdin or on the command line (which Python
    hands over as surrogate escapes), are an SBDError rather than a tokenizer traceback."""
    from ..errors import SBDError

    if prompt == "-":
        source, stream = "stdin", getattr(sys.stdin, "buffer", None)  # bytes: decoded strictly below
        data = stream.read() if stream is not None else sys.stdin.read().encode("utf-8", "surrogateescape")
    else:
        try:
            prompt.encode("utf-8")
            return prompt
        except UnicodeEncodeError:
            source = "--prompt"
            try:
                data = os.fsencode(prompt)  # the original bytes of the argument
            except UnicodeEncodeError:
                raise SBDError("the --prompt text is not valid Unicode; pass UTF-8 text") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise SBDError(f"the prompt from {source} is not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}); "
                       "pass UTF-8 text") from None
