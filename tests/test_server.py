"""`mlx-sbd server`: the real server on 127.0.0.1 (a free port), talked to with the real `openai` client.

Most tests use a tiny random char-level llama with a chat template added (fast); the slow ones serve the built-in
SmolLM2 with its shipped SBD adapter. Greedy output through the server must equal mlx_sbd.generate's.
"""

import json
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest

import mlx_sbd
from mlx_sbd.corpus import Corpus
from mlx_sbd.generate import encode_prompt
from mlx_sbd.server import GenerationWorker, ServerThread, create_app, usable_prefix
from mlx_sbd.tiny import make_tiny_model

# A template made of characters the char tokenizer knows, so chat works on the tiny model.
TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")
CONTEXT = 4096


def add_chat_template(folder):
    path = folder / "tokenizer_config.json"
    config = json.loads(path.read_text())
    path.write_text(json.dumps(dict(config, chat_template=TEMPLATE)))
    return folder


def tiny_folder(root, chat=True):
    folder = make_tiny_model(root, hidden_size=64, num_hidden_layers=2, intermediate_size=128, seed=3,
                             max_position_embeddings=CONTEXT)
    return add_chat_template(folder) if chat else folder


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return mlx_sbd.load(str(tiny_folder(tmp_path_factory.mktemp("tiny") / "m")))


@pytest.fixture(scope="module")
def served(tiny):
    """(ServerThread, openai client, model, tokenizer) for the tiny model, served as 'tiny'."""
    model, tokenizer = tiny
    with ServerThread(create_app(model, tokenizer, "tiny")) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
        yield server, client, model, tokenizer


def worker_of(server) -> GenerationWorker:
    return server.server.config.app.state.worker


def prompts():
    return ["12+3=", "hello world", "abc", "Why? 42"]


# ------------------------------------------------------------------------------------------------ basics


def test_health_and_models(served):
    server, client, _, _ = served
    assert httpx.get(server.url + "/health").json()["status"] == "ok"
    assert [m.id for m in client.models.list().data] == ["tiny"]
    assert client.models.retrieve("tiny").id == "tiny" and client.models.retrieve("default").id == "tiny"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4o")


@pytest.mark.parametrize("block_size", [1, 4])
def test_completion_equals_generate(served, block_size):
    _, client, model, tokenizer = served
    for prompt in prompts()[:2]:
        want = mlx_sbd.generate(model, tokenizer, prompt, max_tokens=24, block_size=block_size, chat_template=False)
        r = client.completions.create(model="tiny", prompt=prompt, max_tokens=24, temperature=0,
                                      extra_body={"block_size": block_size})
        assert r.object == "text_completion" and r.choices[0].text == want
        assert r.choices[0].finish_reason in ("length", "stop")
        n_prompt = len(encode_prompt(tokenizer, prompt, chat_template=False))
        assert r.usage.prompt_tokens == n_prompt
        assert r.usage.total_tokens == n_prompt + r.usage.completion_tokens
        assert r.usage.forwards >= 1 and r.usage.tokens_per_forward == pytest.approx(
            r.usage.completion_tokens / r.usage.forwards, abs=1e-3)

        chunks = list(client.completions.create(model="default", prompt=prompt, max_tokens=24, stream=True,
                                                extra_body={"block_size": block_size}))
        assert "".join(c.choices[0].text for c in chunks if c.choices) == want
        assert chunks[-1].choices[0].finish_reason == r.choices[0].finish_reason


def test_chat_equals_generate_streaming_and_not(served):
    _, client, model, tokenizer = served
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi there"}]
    want = mlx_sbd.generate(model, tokenizer, messages, max_tokens=20, block_size=1)
    r = client.chat.completions.create(model="tiny", messages=messages, max_tokens=20)
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == want
    assert r.usage.prompt_tokens == len(encode_prompt(tokenizer, messages))
    assert r.usage.completion_tokens == 20 and r.choices[0].finish_reason == "length"

    # max_completion_tokens is the newer name of max_tokens
    r2 = client.chat.completions.create(model="default", messages=messages, max_completion_tokens=7)
    assert r2.usage.completion_tokens == 7

    chunks = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=20, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want
    assert all(c.usage is None for c in chunks[:-1])
    last = chunks[-1]
    assert last.choices == [] and last.usage.completion_tokens == 20
    assert last.usage.prompt_tokens == r.usage.prompt_tokens and last.usage.forwards == r.usage.forwards
    assert chunks[-2].choices[0].finish_reason == "length"
    no_usage = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=5, stream=True))
    assert all(c.usage is None for c in no_usage)


def test_draft_sources_over_http(served):
    """The tiny served model has no SBD adapter: prompt lookup by default (fewer forwards than tokens where the
    text repeats), draft=none one token per forward, the same text either way; lookup without verification is 400."""
    server, client, model, tokenizer = served
    prompt = "abcabcabcabcabc"
    want = mlx_sbd.generate(model, tokenizer, prompt, max_tokens=24, block_size=1, chat_template=False)
    r = client.completions.create(model="tiny", prompt=prompt, max_tokens=24)
    plain = client.completions.create(model="tiny", prompt=prompt, max_tokens=24, extra_body={"draft": "none"})
    branched = client.completions.create(model="tiny", prompt=prompt, max_tokens=24, extra_body={"branch": "auto"})
    assert r.choices[0].text == plain.choices[0].text == branched.choices[0].text == want
    assert plain.usage.forwards == plain.usage.completion_tokens == 24
    assert r.usage.forwards < 24 and r.usage.accepted > 0
    error = assert_openai_error(post(server, "/v1/completions", dict(GOOD, draft="lookup", verify=False)), 400)
    assert "draft" in error["message"]
    assert_still_serving(server)


def test_content_parts_are_joined(served):
    _, client, model, tokenizer = served
    parts = [{"type": "text", "text": "hi "}, {"type": "text", "text": "there"}]
    r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": parts}], max_tokens=8)
    want = mlx_sbd.generate(model, tokenizer, [{"role": "user", "content": "hi there"}], max_tokens=8)
    assert r.choices[0].message.content == want


def a_stop_string(text: str) -> str:
    """Two characters of `text` whose first occurrence is not at its start (else its first two)."""
    for j in range(1, len(text) - 1):
        if text.find(text[j : j + 2]) > 0:
            return text[j : j + 2]
    return text[:2]


@pytest.mark.parametrize("stream", [False, True])
def test_stop_strings(served, stream):
    _, client, model, tokenizer = served
    full = mlx_sbd.generate(model, tokenizer, "12+3=", max_tokens=30, chat_template=False)
    stop = a_stop_string(full)
    want = full[: full.find(stop)]
    assert want == mlx_sbd.generate(model, tokenizer, "12+3=", max_tokens=30, chat_template=False, stop=[stop])
    r = client.completions.create(model="tiny", prompt="12+3=", max_tokens=30, stop=[stop, "never"], stream=stream)
    if stream:
        chunks = list(r)
        assert "".join(c.choices[0].text for c in chunks) == want and chunks[-1].choices[0].finish_reason == "stop"
    else:
        assert r.choices[0].text == want and r.choices[0].finish_reason == "stop"
    r = client.completions.create(model="tiny", prompt="12+3=", max_tokens=30, stop=stop)  # a single string
    assert r.choices[0].text == want


def test_token_id_prompt(served):
    _, client, model, tokenizer = served
    ids = encode_prompt(tokenizer, "12+3=", chat_template=False)
    r = client.completions.create(model="tiny", prompt=ids, max_tokens=10)
    assert r.choices[0].text == mlx_sbd.generate(model, tokenizer, ids, max_tokens=10)


def test_seed_makes_sampling_repeatable(served):
    _, client, _, _ = served
    a, b = (client.completions.create(model="tiny", prompt="abc", max_tokens=30, temperature=1.5, seed=7)
            for _ in range(2))
    assert a.choices[0].text == b.choices[0].text


def test_top_k_past_the_vocabulary_means_no_filter(served):
    """mlx_lm's top-k refuses k >= vocabulary size (and a failure inside its sampler breaks MLX's random state for
    every later sampled request): the server treats such a k as no filter."""
    _, client, _, _ = served
    r = client.completions.create(model="tiny", prompt="abc", max_tokens=5, temperature=1, seed=3,
                                  extra_body={"top_k": 10**6})
    same = client.completions.create(model="tiny", prompt="abc", max_tokens=5, temperature=1, seed=3)
    assert r.choices[0].text == same.choices[0].text
    assert client.completions.create(model="tiny", prompt="abc", max_tokens=5, temperature=1).usage.completion_tokens


# ------------------------------------------------------------------------------------------------ errors

GOOD = {"model": "tiny", "prompt": "12+3=", "max_tokens": 4}


def post(server, path, body=None, content=None, headers=None):
    if body is not None:  # json.dumps, unlike httpx's encoder, writes NaN as Python's json.loads reads it
        content, headers = json.dumps(body).encode(), {"content-type": "application/json"}
    return httpx.post(server.url + path, content=content, headers=headers, timeout=60)


def assert_openai_error(response, status, param=None):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if param is not None:
        assert error["param"] == param
    return error


def assert_still_serving(server):
    r = post(server, "/v1/completions", GOOD)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4


BAD_FIELDS = [
    ({"prompt": ""}, "prompt"),
    ({"prompt": 5}, "prompt"),
    ({"prompt": ["a", "b"]}, "prompt"),
    ({"prompt": [1, 2, 10**9]}, "prompt"),
    ({"prompt": [1, -1]}, "prompt"),  # -1 is the mask token's id: never a prompt token
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": "5"}, "max_tokens"),
    ({"max_tokens": True}, "max_tokens"),
    ({"max_completion_tokens": 2.5}, "max_completion_tokens"),
    ({"temperature": -1}, "temperature"),
    ({"temperature": "hot"}, "temperature"),
    ({"top_p": 1.5}, "top_p"),
    ({"top_k": -2}, "top_k"),
    ({"seed": "x"}, "seed"),
    ({"seed": -1}, "seed"),
    ({"seed": 2**64}, "seed"),
    ({"stop": 5}, "stop"),
    ({"stop": ["a", 3]}, "stop"),
    ({"stream": "yes"}, "stream"),
    ({"stream_options": "usage"}, "stream_options"),
    ({"stream": True, "stream_options": {"include_usage": "yes"}}, "include_usage"),
    ({"n": 2}, "n"),
    ({"logprobs": 3}, "logprobs"),
    ({"block_size": 0}, "block_size"),
    ({"block_size": 2.5}, "block_size"),
    ({"block_size": 257}, "block_size"),
    ({"gamma": -0.1}, "gamma"),
    ({"verify": "no"}, "verify"),
    ({"selector": "nope"}, "selector"),
    ({"selector": ["entropy"]}, "selector"),
    ({"draft": "nope"}, "draft"),
    ({"layout": ["predraft"]}, "layout"),
    ({"branch": -1}, "branch"),
    ({"branch": "some"}, "branch"),
    ({"branch": True}, "branch"),
    ({"temperature": float("nan")}, "temperature"),
    ({"model": 3}, "model"),
]


@pytest.mark.parametrize("fields,param", BAD_FIELDS)
def test_invalid_fields_are_400(served, fields, param):
    server = served[0]
    assert_openai_error(post(server, "/v1/completions", dict(GOOD, **fields)), 400, param)
    assert_still_serving(server)


@pytest.mark.parametrize("body", [
    {"messages": []},
    {"messages": "hi"},
    {"messages": [{"content": "no role"}]},
    {"messages": [{"role": "user", "content": 5}]},
    {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
    {"prompt": "chat needs messages"},
])
def test_invalid_messages_are_400(served, body):
    server = served[0]
    assert_openai_error(post(server, "/v1/chat/completions", dict(body, model="tiny")), 400)
    assert_still_serving(server)


@pytest.mark.parametrize("content", [b"{not json", b"[1, 2]", b"\xff\xfe", b"", b"[" * 200_000])
def test_malformed_bodies_are_400(served, content):
    server = served[0]
    r = post(server, "/v1/completions", content=content, headers={"content-type": "application/json"})
    assert_openai_error(r, 400)
    assert_still_serving(server)


def test_prompt_longer_than_the_context_is_400(served):
    server, client, _, _ = served
    for stream in (False, True):  # a stream that cannot start is still a plain 400, not a broken stream
        with pytest.raises(openai.BadRequestError, match="context"):
            r = client.completions.create(model="tiny", prompt="a" * (CONTEXT + 10), max_tokens=4, stream=stream)
            list(r) if stream else None
        assert_still_serving(server)


def test_unknown_model_is_404(served):
    server, client, _, _ = served
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="gpt-4o", prompt="hi", max_tokens=4)
    assert e.value.body["code"] == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}], max_tokens=4)
    assert_still_serving(server)


@pytest.mark.parametrize("method,path", [("GET", "/nope"), ("POST", "/v1/engines"), ("GET", "/v1/chat")])
def test_unknown_routes_are_404(served, method, path):
    server = served[0]
    assert_openai_error(httpx.request(method, server.url + path), 404)
    assert_still_serving(server)


def test_wrong_method_is_405(served):
    server = served[0]
    assert_openai_error(httpx.get(server.url + "/v1/completions"), 405)
    assert_still_serving(server)


def test_oversized_bodies_are_413(served):
    server = served[0]
    big = {"model": "tiny", "prompt": "a" * (2 << 20), "max_tokens": 4}
    assert_openai_error(post(server, "/v1/completions", big), 413)
    assert_still_serving(server)

    def chunked():  # no content-length: the limit must hold while reading
        for _ in range(40):
            yield b" " * (64 << 10)

    r = httpx.post(server.url + "/v1/completions", content=chunked(), headers={"content-type": "application/json"})
    assert_openai_error(r, 413)
    assert_still_serving(server)


def test_chat_without_a_template_is_400(tmp_path):
    model, tokenizer = mlx_sbd.load(str(tiny_folder(tmp_path / "plain", chat=False)))
    with ServerThread(create_app(model, tokenizer, "plain")) as server:
        r = post(server, "/v1/chat/completions", {"model": "plain", "messages": [{"role": "user", "content": "hi"}]})
        assert "chat template" in assert_openai_error(r, 400)["message"]
        r = post(server, "/v1/completions", {"model": "plain", "prompt": "hi", "max_tokens": 3})
        assert r.status_code == 200


# ------------------------------------------------------------------------------------------------ prompt cache


@pytest.mark.parametrize("block_size", [1, 4])
def test_second_turn_prefills_only_the_new_tokens(tiny, block_size, monkeypatch):
    """Turn 2 re-sends turn 1 and its answer: only what follows the reusable prefix is prefilled, and the answer is
    the one a fresh generation on the whole conversation gives."""
    import mlx_sbd.server as server_module

    model, tokenizer = tiny
    prefilled = []
    real = server_module.stream_generate

    def spy(model, tokenizer, prompt, **kw):
        prefilled.append(len(prompt))  # the ids the worker passes on are exactly what gets prefilled
        return real(model, tokenizer, prompt, **kw)

    monkeypatch.setattr(server_module, "stream_generate", spy)
    with ServerThread(create_app(model, tokenizer, "tiny")) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
        turn1 = [{"role": "user", "content": "hello there"}]
        extra = {"block_size": block_size}
        a1 = client.chat.completions.create(model="tiny", messages=turn1, max_tokens=12, extra_body=extra)
        assert a1.usage.prompt_tokens_details.cached_tokens == 0
        turn2 = turn1 + [{"role": "assistant", "content": a1.choices[0].message.content},
                         {"role": "user", "content": "and now?"}]
        a2 = client.chat.completions.create(model="tiny", messages=turn2, max_tokens=12, extra_body=extra)
        ids1, ids2 = encode_prompt(tokenizer, turn1), encode_prompt(tokenizer, turn2)
        cached = a2.usage.prompt_tokens_details.cached_tokens
        assert a2.usage.prompt_tokens == len(ids2)
        assert prefilled == [len(ids1), len(ids2) - cached]
        # at least turn 1's prompt is reused (up to the tail that opens the first SBD block)
        assert cached >= min(len(ids1), usable_prefix(ids2, ids2, block_size)) > 0
        fresh = mlx_sbd.generate(model, tokenizer, turn2, max_tokens=12, block_size=block_size)
        assert a2.choices[0].message.content == fresh


def test_repeated_prompt_reuses_cache_and_gives_the_same_answer(served):
    _, client, _, _ = served
    a, b = (client.completions.create(model="tiny", prompt="Why? 42 is", max_tokens=16) for _ in range(2))
    assert a.choices[0].text == b.choices[0].text
    assert b.usage.prompt_tokens_details.cached_tokens == b.usage.prompt_tokens - 1


def test_a_new_conversation_does_not_take_another_ones_cache(tiny):
    """B shares only A's system prompt: B gets a copy of that prefix, and A's turn 2 still finds all of turn 1."""
    model, tokenizer = tiny
    with ServerThread(create_app(model, tokenizer, "tiny", cache_size=4)) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
        system = {"role": "system", "content": "You are brief."}
        a1 = [system, {"role": "user", "content": "hello"}]
        ra = client.chat.completions.create(model="tiny", messages=a1, max_tokens=8)
        rb = client.chat.completions.create(model="tiny", messages=[system, {"role": "user", "content": "why"}],
                                            max_tokens=8)
        assert 0 < rb.usage.prompt_tokens_details.cached_tokens < ra.usage.prompt_tokens
        a2 = a1 + [{"role": "assistant", "content": ra.choices[0].message.content},
                   {"role": "user", "content": "more"}]
        r2 = client.chat.completions.create(model="tiny", messages=a2, max_tokens=8)
        assert r2.usage.prompt_tokens_details.cached_tokens >= ra.usage.prompt_tokens
        assert r2.choices[0].message.content == mlx_sbd.generate(model, tokenizer, a2, max_tokens=8)
        assert len(worker_of(server).caches.entries) == 2  # A's turn 2 replaced its turn 1; B's stays


def test_the_draft_corpus_is_indexed_before_the_first_request(tiny):
    """The corpus's index (~0.5 s for the built-in adapter's) is built when the server starts, not in the first
    request; answers drafted from it are still generate's."""
    model, tokenizer = tiny
    kept = model.corpus
    model.corpus = corpus = Corpus.from_docs([tokenizer.encode("hello there, hello again")] * 3)
    try:
        app = create_app(model, tokenizer, "tiny", cache_size=0)
        assert "tables" in vars(corpus)  # functools.cached_property keeps it in the instance's dict once built
        with ServerThread(app) as server:
            client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
            r = client.completions.create(model="tiny", prompt="hello", max_tokens=12, extra_body={"draft": "lookup"})
        assert r.choices[0].text == mlx_sbd.generate(model, tokenizer, "hello", max_tokens=12, chat_template=False,
                                                     draft="none")
    finally:
        model.corpus = kept


def test_usable_prefix_keeps_the_first_block_tail_new():
    assert usable_prefix([1, 2, 3, 4, 5], [1, 2, 3, 4, 5], 1) == 4  # one token must stay new
    assert usable_prefix([1, 2, 3, 9], [1, 2, 3, 4, 5], 1) == 3
    assert usable_prefix([1, 2, 3, 4, 5, 6, 7], [1, 2, 3, 4, 5, 6], 4) == 4  # 6 % 4 = 2 tail tokens open the block
    assert usable_prefix([1, 2, 3, 4, 5, 6, 7, 8, 9], [1, 2, 3, 4, 5, 6, 7, 8], 4) == 7  # aligned: no tail
    assert usable_prefix([7], [1, 2], 4) == 0


# ------------------------------------------------------------------------------------------------ concurrency


def test_concurrent_clients_get_their_own_answers(served):
    _, client, model, tokenizer = served
    jobs = [(p, k) for p in prompts() for k in (1, 4)]
    want = {job: mlx_sbd.generate(model, tokenizer, job[0], max_tokens=16, block_size=job[1], chat_template=False)
            for job in jobs}
    got, errors = {}, []

    def run(job):
        try:
            r = client.completions.create(model="tiny", prompt=job[0], max_tokens=16, extra_body={"block_size": job[1]})
            got[job] = r.choices[0].text
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(job,)) for job in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and got == want


def wait_for_outcome(worker, job_count, timeout=30):
    deadline = time.time() + timeout
    while len(worker.history) < job_count and time.time() < deadline:
        time.sleep(0.02)
    return worker.history[-1]


@pytest.mark.parametrize("stream", [True, False])
def test_client_disconnect_stops_its_generation(served, stream):
    server = served[0]
    worker = worker_of(server)
    before = len(worker.history)
    # one token per forward: lookup drafts on this repetitive tiny model could finish before the client hangs up
    body = dict(GOOD, prompt="abc", max_tokens=CONTEXT - 10, stream=stream, draft="none")
    if stream:
        with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as r:
            for line in r.iter_lines():
                if line.startswith("data:"):
                    break  # one chunk, then hang up
    else:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(server.url + "/v1/completions", json=body, timeout=0.2)  # hang up well before it ends
    _, outcome, tokens = wait_for_outcome(worker, before + 1)
    assert outcome == "cancelled" and tokens < CONTEXT - 10
    assert_still_serving(server)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ctrl_c_shuts_down_cleanly(tmp_path):
    """SIGINT with a long stream in flight: the generation ends, the server exits 0 within seconds, no traceback."""
    folder = tiny_folder(tmp_path / "m")
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "mlx_sbd", "server", "--model", str(folder), "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 60
        while True:
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None and time.time() < deadline, proc.stderr.read() if proc.poll() else "timeout"
            time.sleep(0.1)
        events = []

        def stream():
            body = dict(GOOD, model="default", prompt="abc", max_tokens=CONTEXT - 10, stream=True)
            try:
                with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as r:
                    for line in r.iter_lines():
                        events.append(line)
            except httpx.TransportError as e:
                events.append(repr(e))

        client = threading.Thread(target=stream)
        client.start()
        while not events:
            time.sleep(0.01)
        tic = time.time()
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=20)
        client.join(10)
        assert proc.returncode == 0, err
        assert time.time() - tic < 10
        assert "Traceback" not in err and "Shutting down" in err
        assert not client.is_alive()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# ------------------------------------------------------------------------------------------------ the real model


@pytest.fixture(scope="module")
def smol():
    model, tokenizer = mlx_sbd.load()  # built-in SmolLM2-135M-Instruct + its shipped SBD adapter
    with ServerThread(create_app(model, tokenizer, "smollm2")) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=300)
        yield server, client, model, tokenizer


@pytest.mark.slow
@pytest.mark.parametrize("verify", [True, False])
def test_smollm2_chat_equals_generate(smol, verify):
    """The shipped adapter's defaults (block 8, gamma 0.35), greedy: server output == mlx_sbd.generate."""
    _, client, model, tokenizer = smol
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    want = mlx_sbd.generate(model, tokenizer, messages, max_tokens=40, verify=verify)
    r = client.chat.completions.create(model="default", messages=messages, max_tokens=40, temperature=0,
                                       extra_body={"verify": verify})
    assert r.choices[0].message.content == want and want
    assert r.usage.forwards <= r.usage.completion_tokens
    chunks = list(client.chat.completions.create(model="smollm2", messages=messages, max_tokens=40, stream=True,
                                                 stream_options={"include_usage": True}, extra_body={"verify": verify}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens


@pytest.mark.slow
def test_smollm2_completion_and_stop(smol):
    _, client, model, tokenizer = smol
    prompt = "The three primary colors are"
    want = mlx_sbd.generate(model, tokenizer, prompt, max_tokens=24, chat_template=False, stop=[","])
    r = client.completions.create(model="smollm2", prompt=prompt, max_tokens=24, stop=[","])
    assert r.choices[0].text == want
    if "," in mlx_sbd.generate(model, tokenizer, prompt, max_tokens=24, chat_template=False):
        assert r.choices[0].finish_reason == "stop"


@pytest.mark.slow
def test_smollm2_second_turn_uses_the_cache(smol):
    _, client, model, tokenizer = smol
    turn1 = [{"role": "user", "content": "Name a fruit."}]
    a1 = client.chat.completions.create(model="default", messages=turn1, max_tokens=16)
    turn2 = turn1 + [{"role": "assistant", "content": a1.choices[0].message.content},
                     {"role": "user", "content": "And a vegetable?"}]
    a2 = client.chat.completions.create(model="default", messages=turn2, max_tokens=16)
    assert a2.usage.prompt_tokens_details.cached_tokens >= len(encode_prompt(tokenizer, turn1)) - 8
    assert a2.choices[0].message.content == mlx_sbd.generate(model, tokenizer, turn2, max_tokens=16)
