"""`mlx-sbd server`: serve a model over the OpenAI HTTP API (chat/completions, completions, models, health)."""

import click

from ..drafting import DRAFTS, LAYOUTS, parse_branch
from ..samplers import SELECTORS


def model_name(model, adapter_path, no_adapter) -> str:
    """The id /v1/models reports: the --model reference as given (as mlx_lm.server does), or the built-in's name."""
    if model is not None:
        return str(model)
    return "smollm2-135m-instruct" if no_adapter or adapter_path else "smollm2-135m-instruct-sbd"


@click.command("server")
@click.option("--model", default=None, help="HF repo, model folder or .gguf file. Default: built-in SmolLM2-135M-Instruct.")
@click.option("--adapter-path", default=None, help="SBD adapter folder made by `mlx-sbd train`. Default: the adapter shipped for the built-in model.")
@click.option("--no-adapter", is_flag=True, help="Serve the model without any adapter (the plain base).")
@click.option("--no-corpus", is_flag=True, help="Leave out the adapter's draft corpus (the model's own earlier answers that lookup drafts come from; the built-in adapter has one).")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (0.0.0.0 exposes the server to the network).")
@click.option("--port", default=8080, show_default=True, type=int, help="Port to listen on.")
@click.option("--max-tokens", "-m", default=512, show_default=True, type=int, help="Most tokens per answer when a request does not say.")
@click.option("--block-size", "-k", default=None, type=int, help="Default tokens per block (requests may send block_size). Default: the adapter's; 1 for models not trained for SBD.")
@click.option("--gamma", default=None, type=float, help="Default entropy budget (requests may send gamma): of the drafts proposed per forward (verified), or of what a forward reveals (--lossy; 0 = one token per forward). Default: inf with --draft auto (all of the mask block's guesses offered; auto sends the ones that pay), else the adapter's, else 0.1.")
@click.option("--draft", default="auto", show_default=True, type=click.Choice(list(DRAFTS)), help="Where verified decoding's drafts come from: sbd (the adapter's mask block), lookup (n-grams of the prompt and answer: any model, no adapter; where they have none, the adapter's corpus of the model's own answers, if it has one), both, none (one token per forward), auto (chosen per forward from the measured cost of rows and the acceptance seen; the mask block only with an SBD adapter).")
@click.option("--layout", default="auto", show_default=True, type=click.Choice(list(LAYOUTS)), help="Verified forwards with the mask block: linear (one block after the drafts), predraft (one after each draft: the next drafts exist whatever passes, more rows), auto (--draft auto chooses from measured costs; fixed --draft modes use linear).")
@click.option("--branch", default=None, callback=lambda ctx, param, v: parse_branch(v), help="Branch rows per verified forward: the mask block's next-best guesses beside its drafts, each a causal row; when the verifier rejects a draft and its token is that guess, the branch row's next token is the next forward's first draft. N (the likeliest N rows), or auto (--draft auto chooses per forward from the measured cost of rows). Default: auto on a GPU, none on the CPU back-end (measured to cost more than it gains there).")
@click.option("--selector", "--sampler", "selector", default="entropy", show_default=True, type=click.Choice(sorted(SELECTORS)), help="--lossy: which masked positions to reveal each forward (requests may send selector).")
@click.option("--lossy", is_flag=True, help="Default to the paper's loop, which writes the masked guesses straight into the answer (requests may send verify). Default: verified decoding, lossless.")
@click.option("--temp", default=0.0, show_default=True, type=float, help="Default sampling temperature.")
@click.option("--top-p", default=1.0, show_default=True, type=float, help="Default nucleus sampling threshold.")
@click.option("--top-k", default=0, show_default=True, type=int, help="Default top-k (0 = off).")
@click.option("--prompt-cache-size", default=8, show_default=True, type=int, help="Prompt caches kept for reuse across requests (0 = none).")
@click.option("--max-request-bytes", default=1 << 20, show_default=True, type=int, help="Larger request bodies get 413.")
@click.option("--dtype", default=None, type=click.Choice(["float32", "float16", "bfloat16"]), help="Compute dtype. Default: float32 on CPU, the checkpoint's on Metal.")
@click.option("--log-level", default="info", show_default=True, type=click.Choice(["critical", "error", "warning", "info", "debug"]))
def command(model, adapter_path, no_adapter, no_corpus, host, port, max_tokens, block_size, gamma, draft, layout, branch, selector, lossy, temp, top_p,
            top_k, prompt_cache_size, max_request_bytes, dtype, log_level):
    """Serve a model over the OpenAI HTTP API, decoding with SBD.

    \b
    POST /v1/chat/completions  POST /v1/completions  GET /v1/models  GET /health
    Extra request fields: block_size, gamma, selector, draft, layout, branch, verify (false = the paper's lossy loop).
    Needs the server extra: pip install "mlx-sbd[server]".
    """
    import logging

    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise click.ClickException('the server needs FastAPI and uvicorn: pip install "mlx-sbd[server]"') from None

    from ..drafting import resolve_draft
    from ..generate import check_settings, default_settings
    from ..server import Defaults, create_app, make_server
    from . import load_for_decoding

    logging.basicConfig(level=log_level.upper(), format="%(levelname)s:     %(message)s")
    sbd_model, tokenizer = load_for_decoding(model, adapter_path, no_adapter, no_corpus, dtype)
    source = resolve_draft(draft, block_size, not lossy)
    k, g = default_settings(sbd_model, block_size, gamma, source)
    check_settings(max_tokens, k, g)  # bad flags fail now, not on every request
    name = model_name(model, adapter_path, no_adapter)
    defaults = Defaults(max_tokens=max_tokens, block_size=block_size, gamma=gamma, selector=selector,
                        verify=not lossy, draft=draft, layout=layout, branch=branch, temp=temp, top_p=top_p, top_k=top_k)
    app = create_app(sbd_model, tokenizer, name, defaults, cache_size=prompt_cache_size,
                     max_request_bytes=max_request_bytes)
    click.echo(f"Serving '{name}' on http://{host}:{port}/v1 (block size {k}, gamma {g}, "
               f"{'lossy' if lossy else 'verified, drafts: ' + source}); Ctrl-C stops.", err=True)
    try:
        make_server(app, host, port, log_level).run()
    except KeyboardInterrupt:  # uvicorn re-raises Ctrl-C once it has shut down cleanly; nothing is left to do
        pass
    click.echo("Server stopped.", err=True)
