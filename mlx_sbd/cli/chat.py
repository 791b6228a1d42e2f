"""`mlx-sbd chat`: an interactive terminal chat with SBD decoding and a prompt cache kept across turns."""

import click

from ..drafting import DRAFTS, LAYOUTS, parse_branch
from ..samplers import SELECTORS

HELP = """Commands: /reset (or r) starts a new conversation, /stats (or s) toggles statistics after each answer,
/help (or h) shows this, /quit (or q, Ctrl-D) leaves. Ctrl-C stops an answer."""


@click.command("chat")
@click.option("--model", default=None, help="HF repo, model folder or .gguf file. Default: built-in SmolLM2-135M-Instruct.")
@click.option("--adapter-path", default=None, help="SBD adapter folder made by `mlx-sbd train`. Default: the adapter shipped for the built-in model.")
@click.option("--no-adapter", is_flag=True, help="Use the model without any adapter (the plain base).")
@click.option("--no-corpus", is_flag=True, help="Leave out the adapter's draft corpus (the model's own earlier answers that lookup drafts come from; the built-in adapter has one).")
@click.option("--max-tokens", "-m", default=512, show_default=True, type=int, help="Most tokens per answer.")
@click.option("--block-size", "-k", default=None, type=int, help="Tokens per block (1 = plain next-token decoding). Default: the adapter's; 1 for models not trained for SBD.")
@click.option("--gamma", default=None, type=float, help="Entropy budget (nats): of the drafts proposed per forward (verified), or of what a forward reveals (--lossy; 0 = one token per forward). Default: inf with --draft auto (all of the mask block's guesses offered; auto sends the ones that pay), else the adapter's, else 0.1.")
@click.option("--draft", default="auto", show_default=True, type=click.Choice(list(DRAFTS)), help="Where verified decoding's drafts come from: sbd (the adapter's mask block), lookup (n-grams of the prompt and answer: any model, no adapter; where they have none, the adapter's corpus of the model's own answers, if it has one), both, none (one token per forward), auto (chosen per forward from the measured cost of rows and the acceptance seen; the mask block only with an SBD adapter).")
@click.option("--layout", default="auto", show_default=True, type=click.Choice(list(LAYOUTS)), help="Verified forwards with the mask block: linear (one block after the drafts), predraft (one after each draft: the next drafts exist whatever passes, more rows), auto (--draft auto chooses from measured costs; fixed --draft modes use linear).")
@click.option("--branch", default=None, callback=lambda ctx, param, v: parse_branch(v), help="Branch rows per verified forward: the mask block's next-best guesses beside its drafts, each a causal row; when the verifier rejects a draft and its token is that guess, the branch row's next token is the next forward's first draft. N (the likeliest N rows), or auto (--draft auto chooses per forward from the measured cost of rows). Default: auto on a GPU, none on the CPU back-end (measured to cost more than it gains there).")
@click.option("--selector", "--sampler", "selector", default="entropy", show_default=True, type=click.Choice(sorted(SELECTORS)), help="--lossy: which masked positions to reveal each forward.")
@click.option("--lossy", is_flag=True, help="The paper's loop: write the masked guesses straight into the answer (faster with a strong adapter, but the output is no longer the model's own). Default: verified decoding, lossless.")
@click.option("--temp", default=0.0, show_default=True, type=float, help="Sampling temperature (0 = argmax).")
@click.option("--top-p", default=1.0, show_default=True, type=float, help="Nucleus sampling threshold.")
@click.option("--top-k", default=0, show_default=True, type=int, help="Top-k sampling (0 = off).")
@click.option("--seed", default=None, type=int, help="Random seed for sampling.")
@click.option("--system-prompt", default=None, help="System message for the conversation.")
@click.option("--stats/--no-stats", default=False, show_default=True, help="Print statistics after each answer (/stats toggles).")
@click.option("--dtype", default=None, type=click.Choice(["float32", "float16", "bfloat16"]), help="Compute dtype. Default: float32 on CPU, the checkpoint's on Metal.")
def command(model, adapter_path, no_adapter, no_corpus, max_tokens, block_size, gamma, draft, layout, branch, selector, lossy, temp, top_p, top_k, seed,
            system_prompt, stats, dtype):
    """Chat with a model in the terminal, decoding with SBD.

    The conversation's KV cache is kept across turns, so each answer prefills only the new message.
    """
    from ..chat import ChatSession
    from ..errors import SBDError
    from ..drafting import resolve_draft
    from ..generate import check_settings, default_settings, format_stats
    from . import load_for_decoding

    sbd_model, tokenizer = load_for_decoding(model, adapter_path, no_adapter, no_corpus, dtype)
    source = resolve_draft(draft, block_size, not lossy)
    k, g = default_settings(sbd_model, block_size, gamma, source)
    check_settings(max_tokens, k, g)
    settings = dict(max_tokens=max_tokens, block_size=block_size, gamma=gamma, selector=selector, verify=not lossy, draft=draft, layout=layout, branch=branch,
                    temp=temp, top_p=top_p, top_k=top_k, seed=seed)
    session = ChatSession(sbd_model, tokenizer, system_prompt=system_prompt, **settings)
    click.echo(f"[block size {k}, gamma {g}, {'lossy' if lossy else 'verified, drafts: ' + source}] " + HELP, err=True)
    while True:
        try:
            text = input(">> ")
        except (EOFError, KeyboardInterrupt):
            click.echo()
            return
        command_ = text.strip()
        if command_ in ("q", "/q", "/quit", "/exit"):
            return
        if command_ in ("r", "/r", "/reset"):
            session.reset()
            click.echo("[new conversation]", err=True)
            continue
        if command_ in ("s", "/s", "/stats"):
            stats = not stats
            click.echo(f"[stats {'on' if stats else 'off'}]", err=True)
            continue
        if command_ in ("h", "/h", "/help"):
            click.echo(HELP, err=True)
            continue
        if not command_:
            continue
        last, answer = None, session.ask(text)
        try:
            for last in answer:
                click.echo(last.text, nl=False)
            click.echo()
        except KeyboardInterrupt:
            click.echo("\n[stopped]", err=True)
            continue
        except SBDError as e:
            click.echo(f"Error: {e} (/reset starts a new conversation)", err=True)
            continue
        finally:
            answer.close()  # an interrupted answer still joins the history (ChatSession.ask)
        if stats and last is not None:
            click.echo(format_stats(last) + f"\nCached prompt tokens: {session.cached_tokens}", err=True)
