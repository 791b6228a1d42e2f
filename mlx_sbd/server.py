"""`mlx-sbd server`: an OpenAI-compatible HTTP API over stream_generate (SBD decoding behind it).

Three layers, top to bottom:
  - prompt-cache reuse (`usable_prefix`, `PromptCaches`): a conversation re-sends its history every turn, so the
    KV cache of the longest matching token prefix is kept (an LRU, as mlx_lm.server does) and only the new tokens
    are prefilled. `mlx-sbd chat` uses PromptCaches too, with room for one.
  - `GenerationWorker`: MLX is not thread-safe, so every generation runs on one thread, one request at a time in
    arrival order (a queue). Results go back to the HTTP side as events; a cancelled job (client gone, server
    stopping) stops at the next chunk, which is at most one forward away.
  - `create_app`: FastAPI routes, request validation and OpenAI's response / error shapes. FastAPI and uvicorn
    are imported only there (the optional `[server]` extra), so the chat command does not need them.
"""

import asyncio
import copy
import json
import logging
import math
import os
import queue
import threading
import time
import traceback
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, List, Optional, Union

from .decode import SBDCache, make_prompt_cache
from .errors import SBDError
from .generate import GenerationResponse, default_settings, encode_prompt, stream_generate

log = logging.getLogger("mlx_sbd.server")


# ---------------------------------------------------------------------------------------------------------------
# Prompt-cache reuse
# ---------------------------------------------------------------------------------------------------------------


def common_prefix(a, b) -> int:
    """Length of the longest common prefix of two token lists."""
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def usable_prefix(cached: List[int], ids: List[int], block_size: int) -> int:
    """How many leading tokens of `ids` to take from a cache holding `cached`.

    At least one prompt token must stay new (decoding starts from the last prompt token's prediction). With SBD
    the prompt's tail after its last multiple of block_size opens the first decode block and is never prefilled
    (decode.split_prompt), so the reused prefix stops before that tail too: then a cached request decodes exactly
    as a fresh one would (same blocks, same forwards), which keeps greedy output independent of the cache.
    """
    tail = max(1, len(ids) % block_size)
    return max(0, min(common_prefix(cached, ids), len(ids) - tail))


class PromptCaches:
    """An LRU of SBDCaches; a request starts from the one sharing the longest prefix with its prompt, or a new one.

    The usual case, a conversation's next turn, extends everything its cache holds: that cache is taken out and
    comes back extended. A request that shares only part of a cache (a new conversation with the same system
    prompt) gets a copy trimmed to that part, so the conversation the cache belongs to keeps it (as mlx_lm.server
    does). A cache comes back only when its generation finished normally: one cut off mid-block (client gone,
    error) may hold half-written state, so it is dropped rather than trusted. Only the worker thread touches this,
    so it needs no lock.
    """

    def __init__(self, model, size: int):
        self.model = model
        self.size = size
        self.entries: List[SBDCache] = []  # least recently used first

    def take(self, ids: List[int], block_size: int):
        """-> (a cache holding the first n tokens of ids, n): the part of the prompt that needs no prefill."""
        best, best_n = None, 0
        for cache in self.entries:
            n = usable_prefix(cache.tokens, ids, block_size)
            if n < len(cache.tokens) - len(cache.pending) and not cache.can_trim():
                continue  # a cache that cannot be trimmed (rotating, quantized) is reusable only as a whole
            if n > best_n:
                best, best_n = cache, n
        if best is None:
            return make_prompt_cache(self.model), 0
        if best_n == len(best.tokens):
            self.entries.remove(best)  # all of it is reused: no copy needed
        else:
            best = copy.deepcopy(best)  # the original keeps serving its own conversation
            best.trim_to(best_n)
        return best, best_n

    def put(self, cache: SBDCache) -> None:
        """Keep `cache` as the most recent entry; entries it extends are dropped (it serves everything they did)."""
        if self.size <= 0:
            return
        self.entries = [c for c in self.entries if cache.tokens[: len(c.tokens)] != c.tokens] + [cache]
        del self.entries[: max(0, len(self.entries) - self.size)]

    def clear(self) -> None:
        self.entries.clear()


# ---------------------------------------------------------------------------------------------------------------
# The generation worker
# ---------------------------------------------------------------------------------------------------------------


class RequestError(Exception):
    """A request the client must fix (or that cannot be served now), with its HTTP status and OpenAI error fields."""

    def __init__(self, status: int, message: str, param: Optional[str] = None, code: Optional[str] = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type


# The last event of a job whose client went away (nobody reads it; it lets the handler finish).
CLIENT_GONE = RequestError(499, "the client closed the request", code="client_closed_request")


def shutting_down() -> RequestError:
    return RequestError(503, "the server is shutting down", type="server_error", code="shutting_down")


@dataclass
class Chunk:
    response: GenerationResponse  # one stream_generate chunk (its text may be empty)


@dataclass
class Done:
    response: GenerationResponse  # the last chunk: finish_reason and the totals
    cached_tokens: int  # prompt tokens taken from the prompt cache (not prefilled again)


@dataclass
class Failed:
    error: RequestError


@dataclass
class Job:
    """One generation: the prompt, stream_generate's settings, and where its events go."""

    prompt: Any  # str, chat messages or token ids
    chat_template: Optional[bool]
    settings: dict  # stream_generate keyword arguments
    emit: Callable[[Any], None]  # called on the worker thread with Chunk / Done / Failed
    cancelled: threading.Event = field(default_factory=threading.Event)
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])

    def cancel(self) -> None:
        self.cancelled.set()


class GenerationWorker:
    """Runs every generation on one thread, one at a time, in arrival order.

    Every job gets exactly one last event, Done or Failed, so no HTTP handler waits forever.
    `history` keeps (job id, outcome, completion tokens) of recent jobs for logs and tests.
    """

    def __init__(self, model, tokenizer, cache_size: int = 8):
        import mlx.core as mx

        # Loaded weights are lazy arrays bound to the loading thread's stream, and MLX streams are per thread: the
        # worker could not evaluate them ("There is no Stream(cpu, 0) in current thread"). Materialise them here.
        mx.eval(model.parameters())
        corpus = getattr(model, "corpus", None)
        if corpus is not None:  # the draft corpus's index (~0.5 s for the built-in's): built now, not in a request
            corpus.tables
        self.model, self.tokenizer = model, tokenizer
        self.caches = PromptCaches(model, cache_size)
        self.jobs: "queue.Queue[Optional[Job]]" = queue.Queue()
        self.stopping = threading.Event()
        self.history: List[tuple] = []
        self.thread = threading.Thread(target=self._run, name="mlx-sbd-generation", daemon=True)

    def start(self) -> "GenerationWorker":
        self.thread.start()
        return self

    def submit(self, job: Job) -> Job:
        if self.stopping.is_set():
            raise shutting_down()
        self.jobs.put(job)
        return job

    def stop(self, timeout: Optional[float] = None) -> None:
        """End the running generation at its next chunk, fail the queued ones (503), and end the thread."""
        self.stopping.set()
        self.jobs.put(None)
        if timeout is not None and self.thread.is_alive() and threading.current_thread() is not self.thread:
            self.thread.join(timeout)

    def queued(self) -> int:
        return self.jobs.qsize()

    def _run(self) -> None:
        while True:
            job = self.jobs.get()
            if job is None:
                break
            if self.stopping.is_set():
                self._emit(job, Failed(shutting_down()))
                continue
            if job.cancelled.is_set():
                self._emit(job, Failed(CLIENT_GONE))
                self._record(job, "cancelled", 0)
                continue
            self._serve(job)
        # Whatever is still queued when the thread ends is answered, so no client waits forever.
        while True:
            try:
                job = self.jobs.get_nowait()
            except queue.Empty:
                return
            if job is not None:
                self._emit(job, Failed(shutting_down()))

    def _serve(self, job: Job) -> None:
        last, outcome = None, "failed"
        try:
            ids = self._encode(job)
            block_size, _ = default_settings(self.model, job.settings.get("block_size"), job.settings.get("gamma"))
            cache, cached = self.caches.take(ids, block_size)
            gen = stream_generate(self.model, self.tokenizer, ids[cached:], prompt_cache=cache, **job.settings)
            try:
                for last in gen:
                    if job.cancelled.is_set() or self.stopping.is_set():
                        break
                    self._emit(job, Chunk(last))
            finally:
                gen.close()  # stops decoding now; nothing else runs on this thread meanwhile
            if last is not None and last.finish_reason is not None and not job.cancelled.is_set():
                self.caches.put(cache)  # finished normally: its tokens are all valid for the next request
                outcome = last.finish_reason
                self._emit(job, Done(last, cached))
            elif self.stopping.is_set() and not job.cancelled.is_set():
                outcome = "shutdown"
                self._emit(job, Failed(shutting_down()))
            else:
                outcome = "cancelled"
                self._emit(job, Failed(CLIENT_GONE))
        except RequestError as e:
            self._emit(job, Failed(e))
        except SBDError as e:
            self._emit(job, Failed(RequestError(400, str(e))))
        except Exception as e:  # a bug, not the client's fault: log it, answer 500, keep serving
            log.error("request %s failed:\n%s", job.id, traceback.format_exc())
            # An exception inside mlx_lm's compiled sampler leaves MLX's random state unusable ("eval an array
            # without a primitive" on every later sampled request); a fresh seed repairs it.
            import mlx.core as mx

            mx.random.seed(int.from_bytes(os.urandom(8), "little"))
            self._emit(job, Failed(RequestError(500, f"internal error: {type(e).__name__}: {e}", type="server_error")))
        finally:
            self._record(job, outcome, last.generation_tokens if last is not None else 0)

    def _encode(self, job: Job) -> List[int]:
        """Prompt -> token ids (the chat template runs here, on the worker, like everything touching the model)."""
        try:
            ids = encode_prompt(self.tokenizer, job.prompt, job.chat_template)
        except SBDError:
            raise
        except Exception as e:  # a chat template that rejects the messages (e.g. roles out of order) is user input
            raise RequestError(400, f"could not apply the chat template to these messages: {e}", param="messages")
        if not ids:
            raise RequestError(400, "the prompt is empty", param="prompt")
        return ids

    def _emit(self, job: Job, event) -> None:
        try:
            job.emit(event)
        except Exception:  # the HTTP side is gone (event loop closed at shutdown): nothing to tell
            job.cancel()

    def _record(self, job: Job, outcome: str, tokens: int) -> None:
        self.history = self.history[-99:] + [(job.id, outcome, tokens)]
        log.info("request %s: %s, %d completion tokens", job.id, outcome, tokens)


# ---------------------------------------------------------------------------------------------------------------
# Request parsing (explicit checks, so every bad field is a 400 that names it)
# ---------------------------------------------------------------------------------------------------------------


def _bad(param: str, message: str) -> RequestError:
    return RequestError(400, f"'{param}' {message}", param=param)


def _number(body: dict, name: str, default, lo=None, hi=None, integer=False):
    value = body.get(name)
    if value is None:
        return default
    kinds = (int,) if integer else (int, float)
    # bool is an int in Python but never a valid number here; JSON also lets NaN / Infinity through.
    if isinstance(value, bool) or not isinstance(value, kinds) or not math.isfinite(value):
        raise _bad(name, f"must be {'an integer' if integer else 'a number'}, got {json.dumps(value)}")
    if lo is not None and value < lo:
        raise _bad(name, f"must be >= {lo}, got {value}")
    if hi is not None and value > hi:
        raise _bad(name, f"must be <= {hi}, got {value}")
    return value


def _bool(body: dict, name: str, default: bool) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise _bad(name, f"must be true or false, got {json.dumps(value)}")
    return value


def _stop(body: dict) -> List[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    if isinstance(stop, str):
        return [stop]
    if isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        return stop
    raise _bad("stop", "must be a string or a list of strings")


def _messages(body: dict) -> List[dict]:
    """OpenAI chat messages -> [{"role", "content": str}] for the chat template; content parts must be text."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _bad("messages", "must be a non-empty list of {role, content} objects")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise _bad(f"messages[{i}]", "must be an object with a string 'role'")
        content = m.get("content")
        if content is None:
            content = ""
        elif isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise _bad(f"messages[{i}].content", "may only hold text parts ({\"type\": \"text\", \"text\": ...})")
            content = "".join(p["text"] for p in content)
        elif not isinstance(content, str):
            raise _bad(f"messages[{i}].content", "must be a string or a list of text parts")
        out.append({"role": m["role"], "content": content})
    return out


def _prompt(body: dict, vocab_size: int):
    """/v1/completions prompt: a string, a one-string list, or token ids (list of ints, or a one-item list of them)."""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # the openai client sends a batch of one this way
    if isinstance(prompt, str):
        if not prompt:
            raise _bad("prompt", "must not be empty")
        return prompt
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        bad = [t for t in prompt if not 0 <= t < vocab_size]
        if bad:
            raise _bad("prompt", f"has token ids outside the vocabulary [0, {vocab_size}): {bad[:5]}")
        return prompt
    if isinstance(prompt, list) and len(prompt) > 1 and all(isinstance(p, (str, list)) for p in prompt):
        raise _bad("prompt", "holds several prompts; this server takes one prompt per request")
    raise _bad("prompt", "must be a non-empty string or a list of token ids")


MAX_BLOCK_SIZE = 256  # far above what SBD is trained for (the paper: up to 16)


@dataclass
class Defaults:
    """Settings for requests that do not give them (the server command's flags)."""

    max_tokens: int = 512
    block_size: Optional[int] = None  # None: the adapter's recommendation (default_settings)
    gamma: Optional[float] = None
    selector: str = "entropy"
    verify: bool = True
    draft: str = "auto"
    layout: str = "auto"
    branch: Union[int, str, None] = None  # None: the default (drafting.resolve_branch); "auto"; or a count
    temp: float = 0.0
    top_p: float = 1.0
    top_k: int = 0


def parse_settings(body: dict, defaults: Defaults, vocab_size: int) -> dict:
    """The request's decoding fields -> stream_generate keyword arguments (OpenAI names -> ours)."""
    max_tokens = body.get("max_completion_tokens")
    name = "max_completion_tokens" if max_tokens is not None else "max_tokens"
    settings = dict(
        max_tokens=_number(body, name, defaults.max_tokens, lo=1, integer=True),
        temp=_number(body, "temperature", defaults.temp, lo=0),
        top_p=_number(body, "top_p", defaults.top_p, lo=0, hi=1),
        top_k=_number(body, "top_k", defaults.top_k, lo=0, integer=True),
        seed=_number(body, "seed", None, lo=0, hi=2**64 - 1, integer=True),  # MLX seeds are uint64
        stop=_stop(body),
        # SBD's own fields (not in OpenAI's API; clients send them as extra body fields)
        # capped so one request cannot make every forward of a shared server thousands of positions wide
        block_size=_number(body, "block_size", defaults.block_size, lo=1, hi=MAX_BLOCK_SIZE, integer=True),
        gamma=_number(body, "gamma", defaults.gamma, lo=0),
        verify=_bool(body, "verify", defaults.verify),
        selector=body.get("selector", defaults.selector),
        draft=body.get("draft", defaults.draft),
        layout=body.get("layout", defaults.layout),
        branch=body.get("branch", defaults.branch),
    )
    if settings["top_k"] >= vocab_size:
        settings["top_k"] = 0  # keeping the top V of V tokens is no filter, and mlx_lm's top-k refuses k >= V
    from .samplers import SELECTORS

    if not isinstance(settings["selector"], str) or settings["selector"] not in SELECTORS:
        raise _bad("selector", f"must be one of {', '.join(SELECTORS)}, got {json.dumps(settings['selector'])}")
    from .drafting import DRAFTS, LAYOUTS, is_count

    for name, allowed in (("draft", DRAFTS), ("layout", LAYOUTS)):
        if not isinstance(settings[name], str) or settings[name] not in allowed:
            raise _bad(name, f"must be one of {', '.join(allowed)}, got {json.dumps(settings[name])}")
    branch = settings["branch"]
    if not (branch is None or branch == "auto" or (is_count(branch) and branch <= MAX_BLOCK_SIZE)):
        raise _bad("branch", f"must be an integer in 0..{MAX_BLOCK_SIZE} or \"auto\", got {json.dumps(branch)}")
    n = _number(body, "n", 1, integer=True)
    if n != 1:
        raise _bad("n", "must be 1: this server returns one choice per request")
    if body.get("logprobs") not in (None, False, 0) or body.get("top_logprobs") not in (None, 0):
        raise _bad("logprobs", "is not supported by this server")
    return settings


# ---------------------------------------------------------------------------------------------------------------
# The HTTP app
# ---------------------------------------------------------------------------------------------------------------


def error_body(e: RequestError) -> dict:
    """OpenAI's error shape: {"error": {"message", "type", "param", "code"}}."""
    return {"error": {"message": e.message, "type": e.type, "param": e.param, "code": e.code}}


def usage(done: Done) -> dict:
    """OpenAI's usage (prompt tokens include the cached ones, as OpenAI counts them) plus SBD's statistics."""
    r = done.response
    prompt_tokens = done.cached_tokens + r.prompt_tokens
    out = {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": r.generation_tokens,
        "total_tokens": prompt_tokens + r.generation_tokens,
        "prompt_tokens_details": {"cached_tokens": done.cached_tokens},
        # SBD's own: forwards during decoding (prefill not counted) and what each one gave on average
        "forwards": r.nfe,
        "tokens_per_forward": round(r.tokens_per_forward, 4),
        "prompt_tps": round(r.prompt_tps, 2),
        "generation_tps": round(r.generation_tps, 2),
    }
    if r.drafted:  # verified decoding: drafts proposed by the masked path, and how many the causal path accepted
        out.update(drafted=r.drafted, accepted=r.accepted, acceptance_rate=round(r.acceptance_rate, 4))
    return out


def create_app(model, tokenizer, model_id: str, defaults: Optional[Defaults] = None, cache_size: int = 8,
               max_request_bytes: int = 1 << 20, worker: Optional[GenerationWorker] = None):
    """The FastAPI app. Its lifespan starts the generation worker and stops it at shutdown.

    Why FastAPI + uvicorn: both well kept and widely deployed; uvicorn handles HTTP/1.1, keep-alive, chunked
    bodies, graceful shutdown on Ctrl-C, and Starlette's streaming responses notice a client that goes away, which is
    what stops a generation. We write no protocol code; only routing, validation and OpenAI's JSON shapes.
    """
    from contextlib import asynccontextmanager

    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    defaults = defaults or Defaults()
    worker = worker or GenerationWorker(model, tokenizer, cache_size)
    created = int(time.time())
    served = {model_id, "default"}
    vocab_size = model.args.vocab_size

    @asynccontextmanager
    async def lifespan(app):
        if not worker.thread.is_alive():
            worker.start()
        yield
        worker.stop(timeout=10)

    app = FastAPI(title="mlx-sbd", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.worker = worker

    def fail(e: RequestError) -> JSONResponse:
        return JSONResponse(error_body(e), status_code=e.status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        # Unknown routes (404) and wrong methods (405) in OpenAI's shape rather than FastAPI's {"detail": ...}.
        message = f"Invalid URL ({request.method} {request.url.path})" if exc.status_code == 404 else str(exc.detail)
        return fail(RequestError(exc.status_code, message, code="unknown_url" if exc.status_code == 404 else None))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception):
        log.error("unhandled error:\n%s", traceback.format_exc())
        return fail(RequestError(500, f"internal error: {type(exc).__name__}", type="server_error"))

    @app.get("/health")
    async def health():
        import mlx.core as mx

        # MLX's allocator counters (GB), so a load test can watch memory from outside the process.
        memory = {"active_gb": mx.get_active_memory() / 1e9, "cache_gb": mx.get_cache_memory() / 1e9,
                  "peak_gb": mx.get_peak_memory() / 1e9}
        return {"status": "ok", "model": model_id, "queued": worker.queued(),
                "prompt_caches": len(worker.caches.entries), "memory": memory}

    def model_card() -> dict:
        return {"id": model_id, "object": "model", "created": created, "owned_by": "mlx-sbd"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}")
    async def one_model(name: str):
        if name not in served:
            return fail(RequestError(404, f"the model '{name}' does not exist; this server serves '{model_id}'",
                                     param="model", code="model_not_found"))
        return model_card()

    async def read_json(request: Request) -> dict:
        """The body as a JSON object, refusing (413) more than max_request_bytes before reading it all."""
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > max_request_bytes:
            raise RequestError(413, f"the request body is {length} bytes; this server takes at most "
                                    f"{max_request_bytes} (--max-request-bytes)", code="request_too_large")
        body = bytearray()
        async for part in request.stream():  # also bounds chunked bodies, which have no content-length
            body += part
            if len(body) > max_request_bytes:
                raise RequestError(413, f"the request body is over {max_request_bytes} bytes "
                                        "(--max-request-bytes)", code="request_too_large")
        try:
            data = json.loads(bytes(body))
        except (ValueError, RecursionError) as e:  # RecursionError: nesting deeper than Python's stack
            raise RequestError(400, f"the request body is not valid JSON: {e}") from None
        if not isinstance(data, dict):
            raise RequestError(400, "the request body must be a JSON object")
        return data

    def check_model(body: dict) -> None:
        name = body.get("model")
        if name is None:
            return
        if not isinstance(name, str):
            raise _bad("model", "must be a string")
        if name not in served:
            raise RequestError(404, f"the model '{name}' does not exist; this server serves '{model_id}' "
                                    "(or use 'default')", param="model", code="model_not_found")

    async def watch_disconnect(request: Request, job: Job) -> None:
        """Cancel the job once the client hangs up. Starlette notices that by itself only for streams that are
        already sending, so this runs while a request waits for its first event and for a whole non-stream answer."""
        while not job.cancelled.is_set():
            if await request.is_disconnected():
                job.cancel()
                return
            await asyncio.sleep(0.25)

    async def complete(request: Request, chat: bool):
        try:
            body = await read_json(request)
            check_model(body)
            prompt = _messages(body) if chat else _prompt(body, vocab_size)
            settings = parse_settings(body, defaults, vocab_size)
            stream = _bool(body, "stream", False)
            options = body.get("stream_options")
            if options is not None and not isinstance(options, dict):
                raise _bad("stream_options", "must be an object")
            include_usage = _bool(options or {}, "include_usage", False)
            # The event loop hands worker events to this request's queue (call_soon_threadsafe: the worker
            # thread must not touch asyncio objects directly).
            loop, events = asyncio.get_running_loop(), asyncio.Queue()
            job = Job(prompt, None if chat else False, settings,
                      lambda event: loop.call_soon_threadsafe(events.put_nowait, event))
            worker.submit(job)
        except RequestError as e:
            return fail(e)

        kind = "chat.completion" if chat else "text_completion"
        rid = ("chatcmpl-" if chat else "cmpl-") + job.id
        head = {"id": rid, "object": kind, "created": int(time.time()), "model": model_id,
                "system_fingerprint": f"mlx-sbd-{_version()}"}

        # Wait for the first event before answering: errors found by the decoder (prompt longer than the context,
        # a bad block_size) then still get their status code and JSON body instead of a broken stream.
        watcher = asyncio.create_task(watch_disconnect(request, job))
        try:
            first = await events.get()
            if isinstance(first, Failed):
                return fail(first.error)
            if not stream:
                text, event = "", first
                while isinstance(event, Chunk):
                    text += event.response.text
                    event = await events.get()
                if isinstance(event, Failed):
                    return fail(event.error)
                reason = event.response.finish_reason
                choice = ({"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                           "finish_reason": reason} if chat else
                          {"index": 0, "text": text, "logprobs": None, "finish_reason": reason})
                return {**head, "choices": [choice], "usage": usage(event)}
        except BaseException:  # this handler was cancelled (server stopping): the job has no one to answer
            job.cancel()
            raise
        finally:
            watcher.cancel()  # from here on a stream's disconnect is noticed by Starlette (body_stream)

        head = {**head, "object": kind + ".chunk"} if chat else head

        def sse(data: dict) -> str:
            return f"data: {json.dumps(data)}\n\n"

        def chunk(text: Optional[str], reason: Optional[str] = None, role: bool = False) -> dict:
            if chat:
                delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text else {})
                choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}
            else:
                choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": reason}
            out = {**head, "choices": [choice]}
            if include_usage:
                out["usage"] = None  # OpenAI: null on every chunk but the last, which carries it
            return out

        async def body_stream():
            # Starlette cancels this generator when the client disconnects; `finally` then stops the generation.
            try:
                if chat:
                    yield sse(chunk(None, role=True))
                event = first
                while True:
                    if isinstance(event, Chunk):
                        if event.response.text:
                            yield sse(chunk(event.response.text))
                    elif isinstance(event, Done):
                        yield sse(chunk(None, event.response.finish_reason))
                        if include_usage:
                            yield sse({**head, "choices": [], "usage": usage(event)})
                        yield "data: [DONE]\n\n"
                        return
                    elif isinstance(event, Failed):  # only a bug or a shutdown can fail a started stream
                        yield sse(error_body(event.error))
                        return
                    event = await events.get()
            finally:
                job.cancel()

        return StreamingResponse(body_stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await complete(request, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await complete(request, chat=False)

    return app


def _version() -> str:
    from . import __version__

    return __version__


def make_server(app, host: str = "127.0.0.1", port: int = 8080, log_level: str = "info"):
    """A uvicorn server whose Ctrl-C first ends the running generation, so open streams close at once and the
    graceful shutdown does not wait for a long answer to finish (5 s backstop for anything else)."""
    import uvicorn

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            app.state.worker.stop()
            super().handle_exit(sig, frame)

    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5,
                            lifespan="on")
    return Server(config)


class ServerThread:
    """Run the app on a background thread at 127.0.0.1 on a free port (tests and benchmarks); `with` stops it.

    The socket is bound here, before the thread starts, so the port is known and nothing else can take it.
    """

    def __init__(self, app, host: str = "127.0.0.1", log_level: str = "warning"):
        import socket

        self.socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.socket.bind((host, 0))
        self.host, self.port = host, self.socket.getsockname()[1]
        self.url = f"http://{host}:{self.port}"
        self.server = make_server(app, host, self.port, log_level)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.socket]}, daemon=True,
                                       name="mlx-sbd-http")

    def __enter__(self) -> "ServerThread":
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.time() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        self.socket.close()
