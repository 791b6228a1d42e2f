"""`mlx-sbd chat`: a terminal chat on stream_generate, keeping one prompt cache across turns.

Every turn renders the whole conversation with the chat template (so templates that add a default system
prompt, or render earlier turns differently, stay right), then reuses the cache for the longest common token
prefix and prefills only the rest: the new user message and the template's glue around it. The reuse rule is
the server's (server.PromptCaches, here with room for one cache).
"""

from typing import Iterator, List, Optional

from .errors import SBDError
from .generate import GenerationResponse, default_settings, encode_prompt, stream_generate
from .server import PromptCaches


class ChatSession:
    """One conversation: its messages and the prompt cache that holds them."""

    def __init__(self, model, tokenizer, system_prompt: Optional[str] = None, **settings):
        if not tokenizer.has_chat_template:
            raise SBDError("this model's tokenizer has no chat template, which `mlx-sbd chat` needs; "
                           "use `mlx-sbd generate` for plain-text prompts")
        self.model, self.tokenizer, self.settings = model, tokenizer, settings
        self.system_prompt = system_prompt
        self.block_size, _ = default_settings(model, settings.get("block_size"), settings.get("gamma"))
        self.caches = PromptCaches(model, size=1)
        self.reset()

    def reset(self) -> None:
        self.messages: List[dict] = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        self.caches.clear()
        self.cached_tokens = 0  # prompt tokens of the last turn taken from the cache

    def ask(self, text: str) -> Iterator[GenerationResponse]:
        """Stream the answer to `text`. The answer joins the history when the generator ends; if it is closed early
        (Ctrl-C) the partial answer is kept but not its cache (it may be cut mid-block): the next turn prefills the
        conversation again."""
        self.messages.append({"role": "user", "content": text})
        started = finished = False
        answer = ""
        try:
            ids = encode_prompt(self.tokenizer, self.messages)
            cache, self.cached_tokens = self.caches.take(ids, self.block_size)
            for r in stream_generate(self.model, self.tokenizer, ids[self.cached_tokens:], prompt_cache=cache,
                                     **self.settings):
                started = True
                answer += r.text
                finished = r.finish_reason is not None
                yield r
            if finished:
                self.caches.put(cache)
        finally:
            if started:
                self.messages.append({"role": "assistant", "content": answer})
            else:  # refused before any token (e.g. the conversation outgrew the context): the turn never happened
                self.messages.pop()
