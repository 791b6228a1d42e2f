"""How well an adapter drafts, on prompts it never saw: verified decoding's tokens per forward on held-out
prompts built from the standard library's held-out modules (stdlib_text's test split) and general chat topics
(general_prompts' test split), which training data built by this library never touches.

Kinds: chat answers (questions about a module, through the chat template) and code completion (a function's
header and docstring; the model writes the body), as the targets of issue 21 name them; and general chat
(questions on held-out everyday topics, through the chat template). Decoding is greedy and verified with the
adapter's drafts alone (draft="sbd": no prompt lookup), so the number is the adapter's.
"""

from typing import Dict, List

from tqdm import tqdm

from . import stdlib_text
from .general_prompts import general_prompts
from .generate import encode_prompt, stream_generate

KINDS = ("chat", "code", "general")


def heldout_prompts(tokenizer, n: int, seed: int = 0, kinds=KINDS) -> Dict[str, List[List[int]]]:
    """{kind: [prompt ids]}, n of each kind, from the held-out (test) modules and topics."""
    modules = stdlib_text.split_modules(seed)["test"]
    out = {}
    if "chat" in kinds:
        out["chat"] = [encode_prompt(tokenizer, p) for p in stdlib_text.chat_prompts(modules, seed)[:n]]
    if "code" in kinds:
        out["code"] = [encode_prompt(tokenizer, p, chat_template=False)
                       for p in stdlib_text.code_prompts(modules, n, seed)]
    if "general" in kinds:
        out["general"] = [encode_prompt(tokenizer, p) for p in general_prompts("test", seed)[:n]]
    return out


MIN_TRIED = 20  # a position's acceptance is reported once drafts reached it this often


def measure(model, tokenizer, prompts: List[List[int]], max_tokens: int = 64, block_size=None,
            draft: str = "sbd", gamma: float = float("inf"), layout: str = "linear", branch=None) -> dict:
    """Verified greedy decoding of each prompt -> {tokens, forwards, tokens_per_forward, rows_per_forward, per_prompt,
    draft_tried, draft_passed, draft_acceptance}. gamma=inf drafts every position of the block each forward, so the
    number is what the adapter's drafts can give (layout "predraft": drafts on every forward, not only after one
    that accepted all). draft_acceptance[j]: how often a draft at position j passed when the drafts before it did
    (positions reached at least MIN_TRIED times), what --draft auto starts from for this adapter. `branch`: branch
    rows per forward (drafting.py; "rescued" counts the rejections they rescued)."""
    tokens = forwards = rows = rescued = 0
    per_prompt = []
    tried, passed = [], []
    for ids in tqdm(prompts, desc="held-out prompts", unit="prompt", leave=False):
        last, drafted, accepted = None, 0, 0
        for last in stream_generate(model, tokenizer, ids, max_tokens=max_tokens, block_size=block_size,
                                     gamma=gamma, draft=draft, layout=layout, branch=branch):
            count_positions(tried, passed, last.drafted - drafted, last.accepted - accepted)
            drafted, accepted = last.drafted, last.accepted
        tokens += last.generation_tokens
        forwards += last.nfe
        rows += last.rows
        rescued += last.rescued
        per_prompt.append(last.tokens_per_forward)
    return {"tokens": tokens, "forwards": forwards, "tokens_per_forward": tokens / max(forwards, 1),
            "rows_per_forward": rows / max(forwards, 1), "rescued": rescued, "per_prompt": per_prompt, "draft_tried": tried,
            "draft_passed": passed, "draft_acceptance": acceptance_rates(tried, passed)}


def pooled(results: List[dict]) -> dict:
    """The per-position counts of several measure() results added up (chat and code together), with their rates."""
    n = max((len(r["draft_tried"]) for r in results), default=0)
    tried = [sum(r["draft_tried"][j] for r in results if j < len(r["draft_tried"])) for j in range(n)]
    passed = [sum(r["draft_passed"][j] for r in results if j < len(r["draft_passed"])) for j in range(n)]
    return {"draft_tried": tried, "draft_passed": passed, "draft_acceptance": acceptance_rates(tried, passed)}


def acceptance_rates(tried: List[int], passed: List[int]) -> List[float]:
    """passed / tried per position, for the leading positions reached at least MIN_TRIED times."""
    rates = []
    for t, p in zip(tried, passed):
        if t < MIN_TRIED:
            break
        rates.append(round(p / t, 4))
    return rates


def count_positions(tried: List[int], passed: List[int], drafted: int, accepted: int) -> None:
    """One forward's verdict per draft position: the first `accepted` drafts passed; the one after them (if any was
    sent) was tried and failed; later ones were never judged (a draft counts only when those before it passed)."""
    for j in range(min(accepted + 1, drafted)):
        if j == len(tried):
            tried.append(0)
            passed.append(0)
        tried[j] += 1
        passed[j] += j < accepted
