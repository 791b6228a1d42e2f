"""Bounded load test of `mlx-sbd server` on loopback: N concurrent clients x M requests each.

Starts the real server (`python -m mlx_sbd server`, its own process, as users run it) on 127.0.0.1 at a free port,
then:
  1. warm-up: two requests;
  2. one at a time: every request in turn from one client (the reference outputs and the latency baseline);
  3. concurrent: --clients threads, each sending its --requests requests back to back (streaming chat
     completions, greedy), all started together.
Every request must complete without error and, greedy, give exactly the output it gave when run alone. Prints a
table of requests/s, latency and time-to-first-token percentiles per phase, and the server's memory (MLX's
allocator counters from /health, and its RSS on Linux) after warm-up, after the one-at-a-time pass and after the
concurrent one; saves everything as JSON. The server is stopped with SIGINT (Ctrl-C) at the end, and that it
exits cleanly is checked too.

    python scripts/bench_server.py                         # built-in SmolLM2 + shipped adapter, 8 x 5, 32 tokens
    python scripts/bench_server.py --tiny --max-tokens 64  # a tiny random model (plumbing only, fast)
    python scripts/bench_server.py --model M --adapter-path A --clients 4 --requests 10 --lossy
"""

import json
import math
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import click

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, save  # noqa: E402

TOPICS = ["tea", "rivers", "bicycles", "volcanoes", "libraries", "owls", "bread", "comets", "chess", "rain"]
FORMS = ["Write one sentence about {}.", "Give two facts about {}.", "What is special about {}?",
         "Describe {} to a child.", "Name a word that rhymes with {}."]
TINY_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def prompts(n: int):
    return [FORMS[i // len(TOPICS) % len(FORMS)].format(TOPICS[i % len(TOPICS)]) + ("" if i < 50 else f" ({i})")
            for i in range(n)]


def percentile(values, q: float) -> float:
    """Nearest-rank percentile (q in [0, 100]) of a non-empty list."""
    s = sorted(values)
    return s[min(len(s), max(1, math.ceil(q / 100 * len(s)))) - 1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_gb(pid: int):
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1e6
    except OSError:
        return None  # not Linux


def make_tiny(folder: Path) -> Path:
    from mlx_sbd.tiny import make_tiny_model

    make_tiny_model(folder, hidden_size=64, num_hidden_layers=2, intermediate_size=128, seed=3)
    path = folder / "tokenizer_config.json"
    path.write_text(json.dumps(dict(json.loads(path.read_text()), chat_template=TINY_TEMPLATE)))
    return folder


def one_request(client, prompt: str, settings: dict) -> dict:
    """A streaming chat completion; returns its text, latency, time to first token and usage."""
    tic = time.perf_counter()
    first, text, usage = None, "", None
    stream = client.chat.completions.create(
        model="default", messages=[{"role": "user", "content": prompt}], max_tokens=settings["max_tokens"],
        temperature=0, stream=True, stream_options={"include_usage": True},
        extra_body={k: v for k, v in settings.items() if k != "max_tokens" and v is not None})
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            first = first or time.perf_counter()
            text += chunk.choices[0].delta.content
        if chunk.usage is not None:
            usage = chunk.usage
    done = time.perf_counter()
    return {"text": text, "latency_s": done - tic, "ttft_s": (first or done) - tic,
            "completion_tokens": usage.completion_tokens, "forwards": usage.forwards,
            "cached_tokens": usage.prompt_tokens_details.cached_tokens}


def run_phase(url: str, jobs, clients: int, settings: dict, timeout: float, deadline: float):
    """jobs: list (one per client) of prompt lists. -> (results by prompt, errors, wall seconds).
    Requests not started by `deadline` (time.time()) are skipped and count as errors: the run always ends."""
    import openai

    results, errors = {}, []

    def client_thread(my_prompts):
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=timeout)
        for p in my_prompts:
            if time.time() > deadline:
                errors.append(f"{p!r}: skipped, past --max-seconds")
                continue
            try:
                results[p] = one_request(client, p, settings)
            except Exception as e:  # noqa: BLE001 - counted and reported
                errors.append(f"{p!r}: {type(e).__name__}: {e}")

    threads = [threading.Thread(target=client_thread, args=(j,)) for j in jobs]
    tic = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results, errors, time.perf_counter() - tic


def summary(name: str, results: dict, errors: list, wall: float, clients: int) -> dict:
    lat = [r["latency_s"] for r in results.values()]
    ttft = [r["ttft_s"] for r in results.values()]
    tokens = sum(r["completion_tokens"] for r in results.values())
    forwards = sum(r["forwards"] for r in results.values())
    return {
        "phase": name, "clients": clients, "requests": len(results), "errors": len(errors),
        "wall_s": wall, "requests_per_s": len(results) / wall, "completion_tokens_per_s": tokens / wall,
        "tokens_per_forward": tokens / max(forwards, 1),
        "latency_s": {f"p{q}": percentile(lat, q) for q in (50, 90, 99)} if lat else {},
        "latency_max_s": max(lat) if lat else None,
        "ttft_s": {f"p{q}": percentile(ttft, q) for q in (50, 90, 99)} if ttft else {},
        "cached_prompt_tokens": sum(r["cached_tokens"] for r in results.values()),
    }


@click.command()
@click.option("--model", default=None, help="Model to serve (default: built-in SmolLM2-135M-Instruct + its adapter).")
@click.option("--adapter-path", default=None)
@click.option("--tiny", is_flag=True, help="Serve a tiny random model instead (tests the plumbing, not the speed).")
@click.option("--clients", default=8, show_default=True)
@click.option("--requests", "per_client", default=5, show_default=True, help="Requests per client.")
@click.option("--max-tokens", default=32, show_default=True)
@click.option("--block-size", default=None, type=int)
@click.option("--gamma", default=None, type=float)
@click.option("--lossy", is_flag=True, help="verify=false on every request (the paper's loop).")
@click.option("--timeout", default=300.0, show_default=True, help="Seconds one request may take.")
@click.option("--max-seconds", default=900.0, show_default=True,
              help="Requests not started this long after the model has loaded are skipped (and fail the run).")
@click.option("--out", default=None, help="JSON output (default: results/bench_server_<model>.json).")
def main(model, adapter_path, tiny, clients, per_client, max_tokens, block_size, gamma, lossy, timeout, max_seconds,
         out):
    import httpx

    tmp = tempfile.TemporaryDirectory()
    if tiny:
        model = str(make_tiny(Path(tmp.name) / "tiny"))
    name = "tiny" if tiny else Path(model).name if model else "smollm2"
    out = out or f"results/bench_server_{name}.json"
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "mlx_sbd", "server", "--port", str(port), "--log-level", "warning"]
    cmd += ["--model", model] if model else []
    cmd += ["--adapter-path", adapter_path] if adapter_path else []
    log_path = Path(tmp.name) / "server.log"
    log = open(log_path, "w")
    server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    # A `kill` / `timeout` of this script must still stop the server (the finally below): turn SIGTERM into an exit.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit("terminated"))
    settings = {"max_tokens": max_tokens, "block_size": block_size, "gamma": gamma, "verify": False if lossy else None}
    all_prompts = prompts(clients * per_client)
    report = {"machine": machine(), "model": model or "built-in smollm2-135m-instruct + shipped adapter",
              "settings": settings, "clients": clients, "requests_per_client": per_client, "memory": {}}

    def memory(label):
        health = httpx.get(url + "/health", timeout=10).json()
        report["memory"][label] = dict(health["memory"], rss_gb=rss_gb(server.pid),
                                       prompt_caches=health["prompt_caches"])

    try:
        deadline = time.time() + 300
        while True:  # wait for the model to load and the server to listen
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if server.poll() is not None or time.time() > deadline:
                raise SystemExit("the server did not start:\n" + log_path.read_text())
            time.sleep(0.2)

        stop_at = time.time() + max_seconds
        run_phase(url, [all_prompts[:2]], 1, settings, timeout, stop_at)  # warm-up (compiles, allocator pools)
        memory("after_warmup")
        print(f"one at a time: {len(all_prompts)} requests ...", flush=True)
        alone, alone_errors, alone_wall = run_phase(url, [all_prompts], 1, settings, timeout, stop_at)
        memory("after_one_at_a_time")
        print(f"concurrent: {clients} clients x {per_client} requests ...", flush=True)
        jobs = [all_prompts[i * per_client : (i + 1) * per_client] for i in range(clients)]
        together, together_errors, together_wall = run_phase(url, jobs, clients, settings, timeout, stop_at)
        memory("after_concurrent")
    finally:
        server.send_signal(signal.SIGINT)  # Ctrl-C: must shut down cleanly
        try:
            rc = server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
            rc = "killed after 30 s"
        log.close()
    server_log = log_path.read_text()

    mismatches = [p for p in all_prompts if p in alone and p in together and alone[p]["text"] != together[p]["text"]]
    phases = [summary("one at a time", alone, alone_errors, alone_wall, 1),
              summary(f"{clients} concurrent", together, together_errors, together_wall, clients)]
    complete = len(alone) == len(together) == len(all_prompts)
    m0, m1 = report["memory"]["after_one_at_a_time"], report["memory"]["after_concurrent"]
    report.update(
        phases=phases, errors=alone_errors + together_errors, outputs_equal=not mismatches and complete,
        mismatched_prompts=mismatches, all_completed=complete, server_exit=rc,
        clean_shutdown=rc == 0 and "Traceback" not in server_log,
        active_memory_growth_gb=m1["active_gb"] - m0["active_gb"],
        rss_growth_gb=None if m0["rss_gb"] is None else m1["rss_gb"] - m0["rss_gb"],
        outputs={p: alone[p]["text"] for p in all_prompts if p in alone},
    )

    print()
    print(f"{'phase':<15} {'reqs':>5} {'err':>4} {'req/s':>7} {'tok/s':>7} {'tok/fwd':>7} "
          f"{'lat p50':>8} {'p90':>7} {'p99':>7} {'ttft p50':>9} {'p90':>7}")
    for s in phases:
        lat, ttft = s["latency_s"], s["ttft_s"]
        print(f"{s['phase']:<15} {s['requests']:>5} {s['errors']:>4} {s['requests_per_s']:>7.2f} "
              f"{s['completion_tokens_per_s']:>7.1f} {s['tokens_per_forward']:>7.2f} {lat.get('p50', 0):>7.2f}s "
              f"{lat.get('p90', 0):>6.2f}s {lat.get('p99', 0):>6.2f}s {ttft.get('p50', 0):>8.2f}s "
              f"{ttft.get('p90', 0):>6.2f}s")
    print()
    for label, m in report["memory"].items():
        rss = "" if m["rss_gb"] is None else f", RSS {m['rss_gb']:.3f} GB"
        print(f"memory {label:<20} MLX active {m['active_gb']:.3f} GB, cache {m['cache_gb']:.3f} GB{rss}, "
              f"{m['prompt_caches']} prompt caches")
    print(f"all {len(all_prompts)} requests completed in both phases: {complete}; errors: {len(report['errors'])}; "
          f"concurrent outputs equal one-at-a-time outputs: {report['outputs_equal']}; "
          f"clean Ctrl-C shutdown: {report['clean_shutdown']}")
    for e in report["errors"][:5]:
        print("  error:", e)
    save(report, out)
    tmp.cleanup()
    if not (report["outputs_equal"] and not report["errors"] and report["clean_shutdown"]):
        sys.exit(1)


if __name__ == "__main__":
    from mlx_sbd.backend import preload_openblas_and_reexec

    preload_openblas_and_reexec()
    main()
