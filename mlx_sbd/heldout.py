"""How well an adapter drafts, on prompts it never saw: verified decoding's tokens per forward on held-out
prompts built from the standard library's held-out modules (stdlib_text's test split, which training data built
by this library never touches).

Two kinds, as the targets of issue 21 name them: chat answers (questions about a module, through the chat
template) and code completion (a function's header and docstring; the model writes the body). Decoding is greedy
and verified with the adapter's drafts alone (draft="sbd": no prompt lookup), so the number is the adapter's.
"""

from typing import Dict, List

from tqdm import tqdm

from . import stdlib_text
from .generate import encode_prompt, stream_generate

KINDS = ("chat", "code")


def heldout_prompts(tokenizer, n: int, seed: int = 0, kinds=KINDS) -> Dict[str, List[List[int]]]:
    """{kind: [prompt ids]}, n of each kind, from the held-out (test) modules."""
    modules = stdlib_text.split_modules(seed)["test"]
    out = {}
    if "chat" in kinds:
        out["chat"] = [encode_prompt(tokenizer, p) for p in stdlib_text.chat_prompts(modules, seed)[:n]]
    if "code" in kinds:
        out["code"] = [encode_prompt(tokenizer, p, chat_template=False)
                       for p in stdlib_text.code_prompts(modules, n, seed)]
    return out


def measure(model, tokenizer, prompts: List[List[int]], max_tokens: int = 64, block_size=None,
            draft: str = "sbd", gamma: float = float("inf")) -> dict:
    """Verified greedy decoding of each prompt -> {tokens, forwards, tokens_per_forward, per_prompt}. gamma=inf
    drafts every position of the block each forward, so the number is what the adapter's drafts can give."""
    tokens = forwards = 0
    per_prompt = []
    for ids in tqdm(prompts, desc="held-out prompts", unit="prompt", leave=False):
        last = None
        for last in stream_generate(model, tokenizer, ids, max_tokens=max_tokens, block_size=block_size,
                                     gamma=gamma, draft=draft):
            pass
        tokens += last.generation_tokens
        forwards += last.nfe
        per_prompt.append(last.tokens_per_forward)
    return {"tokens": tokens, "forwards": forwards, "tokens_per_forward": tokens / max(forwards, 1),
            "per_prompt": per_prompt}
