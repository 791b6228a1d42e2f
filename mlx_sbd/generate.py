"""generate / stream_generate: the public decoding API (same shape as mlx_lm's, plus NFE).

`block_size=1` is plain next-token decoding (mlx_lm's own generate_step); otherwise verified decoding (lossless)
with drafts from the SBD mask block and/or prompt lookup (`draft`), or with verify=False the paper's lossy loop
with the selection rule `selector` ("entropy" = the paper's EB-Sampler) and budget `gamma`.
"""

import contextlib
import math
import operator
import time
from dataclasses import dataclass
from typing import Iterator, List, Optional, Sequence, Union

import mlx.core as mx
from mlx_lm.generate import generation_stream, wired_limit

from .corpus import Corpus
from .decode import SBDCache, decode_steps, make_prompt_cache
from .drafting import LAYOUTS, PromptLookup, resolve_draft
from .errors import SBDError
from .model import SBDModel
from .samplers import make_selector, make_token_sampler

Prompt = Union[str, Sequence[int], List[dict]]


@dataclass
class GenerationResponse:
    text: str  # newly finalised text in this chunk
    tokens: List[int]  # newly finalised token ids in this chunk
    nfe: int  # forward passes so far in decoding (prefill not counted)
    prompt_tokens: int
    prompt_tps: float
    generation_tokens: int
    generation_tps: float
    peak_memory: float  # GB
    finish_reason: Optional[str] = None  # "stop", "length" or None
    drafted: int = 0  # drafts verified so far (verified decoding)
    accepted: int = 0  # of which the causal path accepted
    rows: int = 0  # query rows of the forwards so far (one per token for plain decoding; drafts + masks for SBD)
    rescued: int = 0  # forwards so far whose rejected draft a branch row rescued (verified decoding, drafting.py)

    @property
    def tokens_per_forward(self) -> float:
        return self.generation_tokens / max(self.nfe, 1)

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0


def encode_prompt(tokenizer, prompt: Prompt, chat_template: Optional[bool] = None, system_prompt=None) -> List[int]:
    """str / chat messages / token ids -> ids. Chat models get their template (as mlx_lm's CLI does) unless
    chat_template=False; messages always do. Token ids must be vocabulary rows."""
    if isinstance(prompt, str) or (prompt and isinstance(prompt[0], dict)):
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        for i, msg in enumerate(messages):
            if not isinstance(msg, dict) or not isinstance(msg.get("content"), str) or not isinstance(msg.get("role"), str):
                raise SBDError(f"chat message {i} must be a dict with string 'role' and 'content' (got {msg!r:.80})")
        use_template = tokenizer.has_chat_template if chat_template is None else chat_template
        if isinstance(prompt, list) and not tokenizer.has_chat_template:
            raise SBDError("chat messages need a tokenizer with a chat template; pass a string prompt instead")
        if use_template:
            if system_prompt:
                messages = [{"role": "system", "content": system_prompt}] + messages
            return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True))
        add_special = tokenizer.bos_token is None or not prompt.startswith(tokenizer.bos_token)
        return list(tokenizer.encode(prompt, add_special_tokens=add_special))
    try:
        return [operator.index(t) for t in prompt]  # ints and numpy integers; floats and strings are refused
    except TypeError:
        raise SBDError("a prompt must be a string, a list of chat messages or a list of integer token ids") from None


def check_ids(ids: List[int], vocab_size: int) -> None:
    """Ids outside [0, vocab) would index past the embedding (a crash for ids >= 2**31, garbage below)."""
    bad = next((t for t in ids if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise SBDError(f"prompt token id {bad} is outside the vocabulary [0, {vocab_size})")


def stream_generate(
    model: SBDModel,
    tokenizer,
    prompt: Prompt,
    max_tokens: int = 256,
    block_size: Optional[int] = None,
    gamma: Optional[float] = None,
    selector: str = "entropy",
    temp: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    seed: Optional[int] = None,
    stop: Sequence[str] = (),
    chat_template: Optional[bool] = None,
    system_prompt: Optional[str] = None,
    prompt_cache: Optional[SBDCache] = None,
    prefill_step_size: int = 512,
    ntp_first: bool = True,
    verify: bool = True,
    draft: str = "auto",
    lookup: Optional[PromptLookup] = None,
    layout: str = "auto",
    branch: Union[int, str, None] = None,
    corpus: Union[Corpus, bool, None] = None,
) -> Iterator[GenerationResponse]:
    """Yield GenerationResponse chunks as tokens are finalised (several per forward with SBD).

    verify=True (default): verified decoding, lossless: greedy output equals one-token decoding of the causal path
    (the base model's with a gated adapter), sampling keeps its distribution; `gamma` bounds the summed entropy of
    the drafts proposed per forward (inf, the default with draft "auto": all block_size - 1). verify=False: the paper's loop, where `selector`
    ("entropy" = EB-Sampler) and `gamma` choose what a forward reveals and ntp_first gives every block's first open
    position the causal prediction (decode.sbd_steps). block_size / gamma default to the model's SBD training
    (model.sbd); see default_settings. `seed` seeds MLX's generator (reproducible sampling).

    `draft` (verified decoding): where drafts come from, "sbd" (the mask block), "lookup" (prompt lookup: n-grams
    of the prompt and answer, no adapter needed; `lookup` sets its sizes), "both", "none" (plain next-token
    decoding) or "auto" (the default: source, number of drafts and mask block chosen per forward from time(rows)
    measured on this device and the acceptance seen so far; the mask block only with an SBD adapter; block_size=1
    is none). `layout`: "linear" (one mask block after the drafts), "predraft" (one after each draft, so the next
    drafts exist whatever passes; more rows) or "auto" (auto chooses; fixed draft modes use linear). `branch`: branch
    rows per forward, the mask block's next-best guesses beside its drafts (drafting.py): a count (the likeliest),
    "auto" (draft auto chooses per forward), or None: auto on a GPU, none on the CPU back-end
    (drafting.resolve_branch). `corpus`: where lookup drafts come from when the conversation has no match, the
    model's own earlier answers (corpus.Corpus): None for the adapter folder's (if it has one), False for none."""
    draft = resolve_draft(draft, block_size, verify)
    if layout not in LAYOUTS:
        raise SBDError(f"layout must be one of {', '.join(LAYOUTS)} (got {layout!r})")
    block_size, gamma = default_settings(model, block_size, gamma, draft)
    check_settings(max_tokens, block_size, gamma)
    select = make_selector(selector, gamma if not verify else 0.0)  # verified decoding drafts by gamma, selects nothing
    sample = make_token_sampler(temp, top_p, top_k)  # checks the sampling arguments too
    ids = encode_prompt(tokenizer, prompt, chat_template, system_prompt)
    if not ids:
        raise SBDError("the prompt is empty")
    check_ids(ids, model.args.vocab_size)
    cache = prompt_cache if prompt_cache is not None else make_prompt_cache(model)
    max_length = getattr(model.args, "max_position_embeddings", None) or 1 << 30
    if cache.offset + len(cache.pending) + len(ids) >= max_length:
        raise SBDError(
            f"the prompt has {len(ids)} tokens (+{cache.offset + len(cache.pending)} cached) but the model's context "
            f"is {max_length}; shorten the prompt"
        )
    if seed is not None:
        mx.random.seed(seed)

    with wired_limit(model.lm, [generation_stream]):
        # Prefill is timed on its own, so generation time counts exactly the forwards that produce tokens.
        tic = time.perf_counter()
        steps = decode_steps(model, cache, ids, block_size=block_size, verify=verify, gamma=gamma, select=select,
                             sample=sample, temp=temp, top_p=top_p, top_k=top_k, ntp_first=ntp_first, max_tokens=max_tokens,
                             max_length=max_length, eos_ids=list(tokenizer.eos_token_ids),
                             prefill_step_size=prefill_step_size, draft=draft, lookup=lookup,
                             layout=layout, branch=branch, corpus=corpus)
        prompt_tps = len(ids) / max(time.perf_counter() - tic, 1e-9)

        detokenizer = tokenizer.detokenizer
        detokenizer.reset()
        stops = StopStrings(stop)
        tic, n = time.perf_counter(), 0
        with contextlib.closing(steps):  # a caller that stops early closes it: the cache is left consistent
            for step in steps:
                for t in step.tokens:
                    detokenizer.add_token(t)
                reason = step.finish
                if reason is not None:
                    detokenizer.finalize()
                n += len(step.tokens)
                text, hit = stops.feed(detokenizer.last_segment, final=reason is not None)
                if hit:
                    reason = "stop"
                elapsed = max(time.perf_counter() - tic, 1e-9)
                yield GenerationResponse(
                    text=text,
                    tokens=step.tokens,
                    nfe=step.nfe,
                    prompt_tokens=len(ids),
                    prompt_tps=prompt_tps,
                    generation_tokens=n,
                    generation_tps=n / elapsed,
                    peak_memory=mx.get_peak_memory() / 1e9,
                    finish_reason=reason,
                    drafted=step.drafted,
                    accepted=step.accepted,
                    rows=step.rows,
                    rescued=step.rescued,
                )
                if reason is not None:
                    return


def generate(model: SBDModel, tokenizer, prompt: Prompt, verbose: bool = False, **kwargs) -> str:
    """The whole completion as a string (kwargs as stream_generate). verbose prints text and stats."""
    text, last = "", None
    for last in stream_generate(model, tokenizer, prompt, **kwargs):
        if verbose:
            print(last.text, end="", flush=True)
        text += last.text
    if verbose:
        print()
        print(format_stats(last))
    return text


def format_stats(r: GenerationResponse) -> str:
    return (
        "==========\n"
        f"Prompt: {r.prompt_tokens} tokens, {r.prompt_tps:.3f} tokens-per-sec\n"
        f"Generation: {r.generation_tokens} tokens, {r.generation_tps:.3f} tokens-per-sec\n"
        f"Forward passes: {r.nfe}, {r.tokens_per_forward:.2f} tokens per forward"
        + (f", {r.accepted}/{r.drafted} drafts accepted ({100 * r.acceptance_rate:.0f}%)" if r.drafted else "")
        + (f", {r.rescued} rejections rescued by branch rows" if r.rescued else "")
        + f"\nPeak memory: {r.peak_memory:.3f} GB"
    )


def default_settings(model: SBDModel, block_size: Optional[int], gamma: Optional[float],
                     draft: Optional[str] = None) -> tuple:
    """Unset block_size / gamma: the recommendation stored with the model's SBD adapter (model.sbd); for a model
    never trained for SBD, one token per forward (block decoding would only make poor text) and gamma 0.1. With
    draft "auto" (resolved: verified decoding) gamma defaults to inf: every guess of the mask block is offered and
    auto chooses how many to send by their measured acceptance per position. The EB rule's cut (the adapter's 0.35)
    offered fewer, and auto ran held-out chat at 1.215x mlx_lm against 1.318x with all (BENCHMARKS.md 9)."""
    if block_size is None:
        block_size = model.sbd.block_size if model.sbd else 1
    if gamma is None:
        gamma = float("inf") if draft == "auto" else model.sbd.gamma if model.sbd else 0.1
    return block_size, gamma


def check_settings(max_tokens: int, block_size: int, gamma: float) -> None:
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise SBDError(f"block_size must be an integer >= 1 (got {block_size!r}); 1 means plain next-token decoding")
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or math.isnan(gamma) or gamma < 0:
        raise SBDError(f"gamma must be a number >= 0 (got {gamma!r}); 0 reveals one token per forward")
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise SBDError(f"max_tokens must be an integer >= 1 (got {max_tokens!r})")


class StopStrings:
    """Cuts the text at the first stop string; holds back a tail that could still become one."""

    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in stops if s]
        self.held = ""

    def feed(self, segment: str, final: bool):
        text = self.held + segment
        if not self.stops:
            self.held = ""
            return text, False
        cut = min((i for i in (text.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.held = ""
            return text[:cut], True
        split = len(text) if final else max(len(text) - max(len(s) for s in self.stops) + 1, 0)
        self.held = text[split:]
        return text[:split], False
