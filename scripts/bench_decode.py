"""Decoding speed of every verified layout and draft length beside mlx_lm.generate, the NTP path and the lossy
loop, in one run, with the prediction from time(rows).

Settings (all greedy): mlx_lm.generate; mlx-sbd one token per forward (draft none); the paper's lossy loop; verified
decoding with the mask block's drafts in the linear layout (one block of k after the drafts; gamma inf proposes
k - 1 drafts, so k sets the draft length) and with pre-drafting (a block of k after each draft); `--draft auto`,
the default, which chooses source, drafts and layout per forward (and, with an adapter that has a draft corpus, auto
without it). Per setting: tokens per forward, rows per forward,
tokens/s, the ratio to mlx_lm in the same round (median and range over interleaved rounds), and the tokens/s that
time(rows) predicts for the forwards the setting actually ran (sum of time(rows) over its forwards: the model's
cost alone, no host work), with the gap measured/predicted - 1. time(rows, context) is the one auto uses
(costs.cached_row_cost: the decode forward over caches of 256, 1024, 4096... tokens, read at each forward's context).
--cold starts every auto answer from the priors, as a new process (one `mlx-sbd generate`) does: what auto learned
of the drafts in earlier answers is forgotten; with an adapter that records its drafts' measured acceptance
(SBDSettings.draft_acceptance) a second auto row runs without it, so the prior's worth is measured.
--context N puts a passage of real text (standard-library source) before each question so the prompt is about N
tokens: the same settings over a long cache (each prompt's KV cache is kept and reused by every run of it, so a long
prompt is prefilled once, not once per setting). --draft-window sets the cached keys the mask rows attend to
(attention.DRAFT_WINDOW; "none": all), to measure what the window costs the drafts. The model behind it
(BENCHMARKS.md 7):
    tokens/s = tokens per forward / time(rows per forward)
the paper's Eq. 16 generalised to verified layouts.

    python scripts/bench_decode.py --rounds 2
    python scripts/bench_decode.py --adapter-path mlx_sbd/adapters/smollm2-135m-instruct-sbd-gated
    python scripts/bench_decode.py --context 6000 --linear 3 --predraft 2 --prompts 2 --max-tokens 48
"""

import dataclasses
import statistics
import sys
import time
from pathlib import Path

import click
import mlx.core as mx
from mlx_lm.generate import stream_generate as mlx_lm_stream_generate
from mlx_lm.models.cache import make_prompt_cache, trim_prompt_cache
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, save  # noqa: E402

import mlx_sbd  # noqa: E402
from mlx_sbd import attention  # noqa: E402
from mlx_sbd.adapter import base_layers  # noqa: E402
from mlx_sbd import costs  # noqa: E402
from mlx_sbd.costs import cached_row_cost  # noqa: E402
from mlx_sbd.drafting import forget  # noqa: E402
from mlx_sbd.generate import encode_prompt  # noqa: E402
from mlx_sbd.heldout import KINDS, heldout_prompts  # noqa: E402
from mlx_sbd.stdlib_text import source  # noqa: E402

PROMPTS = [
    "Write a short story about a robot learning to paint.",
    "Explain how a hash table works, with an example in Python.",
    "List ten tips for staying productive when working from home.",
    "What is the capital of France? Answer in one sentence, then describe the city.",
]


def run_mlx_lm(model, tokenizer, ids, max_tokens, cache):
    keep = min(cache[0].offset, len(ids) - 1)  # `cache` holds this prompt from an earlier run: all but its last token
    trim_prompt_cache(cache, cache[0].offset - keep)
    last, start = None, time.perf_counter()
    with base_layers(model) as lm:  # the base as mlx_lm loads it: no idle gated layers in its forwards
        for last in mlx_lm_stream_generate(lm, tokenizer, mx.array(ids[keep:]), max_tokens=max_tokens,
                                           prompt_cache=cache):
            pass
    n = last.generation_tokens
    return {"tokens": n, "seconds": n / last.generation_tps, "nfe": n, "rows": [1] * n,
            "contexts": [len(ids) + i for i in range(n)], "start": start}


def run_sbd(model, tokenizer, ids, max_tokens, cache, no_prior=False, **kw):
    if no_prior:  # the adapter as if it recorded no acceptance of its drafts: auto starts from 1/2 per position
        sbd, model.sbd = model.sbd, dataclasses.replace(model.sbd, draft_acceptance=None)
        try:
            return run_sbd(model, tokenizer, ids, max_tokens, cache, **kw)
        finally:
            model.sbd = sbd
    cache.trim_to(len(ids) - 1)  # `cache` holds this prompt from an earlier run (or nothing): all but its last token
    last, prev, rows, contexts, produced, start = None, 0, [], [], 0, time.perf_counter()
    for last in mlx_sbd.stream_generate(model, tokenizer, ids[len(cache.tokens):], max_tokens=max_tokens,
                                        prompt_cache=cache, **kw):
        if last.rows > prev:  # verified / plain decoding: one response per forward
            rows.append(last.rows - prev)
            contexts.append(len(ids) + produced)  # about the cache it ran over (the prompt and the answer so far)
        prev, produced = last.rows, last.generation_tokens
    n = last.generation_tokens
    return {"tokens": n, "seconds": n / last.generation_tps if n else 0.0, "nfe": last.nfe, "rows": rows,
            "contexts": contexts, "drafted": last.drafted, "accepted": last.accepted, "rescued": last.rescued,
            "start": start}


def long_prompt(tokenizer, question: str, tokens: int) -> list:
    """`question` after about `tokens` tokens of standard-library source, as a chat prompt."""
    text = "".join(source(m) for m in ("collections", "json", "email.message", "textwrap", "inspect"))
    ids = tokenizer.encode(text, add_special_tokens=False)
    passage = tokenizer.decode(ids[:tokens])
    return encode_prompt(tokenizer, f"Here is some Python source:\n\n{passage}\n\n{question}")


@click.command()
@click.option("--model", default=None, help="Model reference (default: built-in SmolLM2-135M-Instruct).")
@click.option("--adapter-path", default=None, help="Default: the built-in model's shipped adapter.")
@click.option("--linear", default="2,3,4,8", show_default=True, help="Block sizes of the linear layout.")
@click.option("--predraft", default="2,3,4", show_default=True, help="Block sizes of pre-drafting.")
@click.option("--max-tokens", default=128, show_default=True)
@click.option("--prompts", "n_prompts", default=len(PROMPTS), show_default=True)
@click.option("--rounds", default=2, show_default=True, help="Interleaved rounds over all settings.")
@click.option("--context", default=0, show_default=True, help="Put about this many tokens of real text before each "
              "prompt (0: the prompts alone).")
@click.option("--cold", is_flag=True, help="Every auto answer starts from the priors, as in a new process (and an "
              "'auto, no prior' row when the adapter records its drafts' acceptance).")
@click.option("--draft-window", default=None, help="Cached keys the mask rows attend to: a number, or 'none' for "
              "all (default: attention.DRAFT_WINDOW, as shipped). The output is the same; drafts and cost change.")
@click.option("--heldout", type=click.Choice(list(KINDS)), default=None, help="Held-out prompts of this kind "
              "(mlx_sbd.heldout: about standard-library modules, or general topics, no training set touches, where "
              "eval_drafts.py measures acceptance) instead of the four general chat prompts.")
@click.option("--no-cost-check", is_flag=True, help="auto keeps the cached time(rows) table however its forwards "
              "disagree with it (the default measures a bucket again when they do; costs.ContextCost.observe).")
@click.option("--auto-gamma", default=None, help="Run auto with this gamma, the EB rule's entropy budget for the mask "
              "block's drafts (auto's default is inf: every guess offered).")
@click.option("--branch-auto", is_flag=True, help="Also run auto choosing branch rows per forward (branch='auto'; "
              "drafting.py), beside the default (none on the CPU back-end).")
@click.option("--out", default="results/bench_decode.json", show_default=True)
def main(model, adapter_path, linear, predraft, max_tokens, n_prompts, rounds, context, cold, draft_window, heldout,
         no_cost_check, auto_gamma, branch_auto, out):
    if heldout and context:
        raise click.UsageError("--heldout decodes the held-out prompts as they are; leave out --context")
    if draft_window is not None:
        attention.DRAFT_WINDOW = None if draft_window == "none" else int(draft_window)
    sbd_model, tokenizer = mlx_sbd.load(model, adapter_path=adapter_path)
    if heldout:
        prompts = heldout_prompts(tokenizer, n_prompts, kinds=(heldout,))[heldout]
    else:
        prompts = [long_prompt(tokenizer, p, context) if context else encode_prompt(tokenizer, p)
                   for p in PROMPTS[:n_prompts]]
    lossy_k = sbd_model.sbd.block_size if sbd_model.sbd else 8
    settings = {"mlx_lm": None, "ntp": dict(draft="none"), f"lossy k={lossy_k}": dict(verify=False)}
    for k in [int(x) for x in linear.split(",") if x]:
        settings[f"linear k={k}"] = dict(draft="sbd", block_size=k, gamma=float("inf"), layout="linear")
    for k in [int(x) for x in predraft.split(",") if x]:
        settings[f"predraft k={k}"] = dict(draft="sbd", block_size=k, gamma=float("inf"), layout="predraft")
    if auto_gamma is None:
        settings["auto (default)"] = dict(draft="auto")
    else:  # not beside the default: the two would share (and mix) what auto learns of the drafts
        settings[f"auto gamma={auto_gamma}"] = dict(draft="auto", gamma=float(auto_gamma))
    if branch_auto:  # shares what auto learns of the mask block's drafts with the default; branch drafts are apart
        settings["auto, branch rows"] = dict(draft="auto", branch="auto")
    if sbd_model.corpus is not None:  # the adapter's draft corpus (corpus.py), measured by leaving it out
        settings["auto, no corpus"] = dict(draft="auto", corpus=False)
    if cold and sbd_model.sbd is not None and sbd_model.sbd.draft_acceptance:
        settings["auto, no prior"] = dict(draft="auto", no_prior=True)

    # One KV cache per prompt and decoder, reused by every run of that prompt: a run prefills only what the cache
    # lacks (a long prompt's prefill, not what is measured, is paid once).
    sbd_caches = [mlx_sbd.make_prompt_cache(sbd_model) for _ in prompts]
    lm_caches = [make_prompt_cache(sbd_model.lm) for _ in prompts]
    if no_cost_check:  # auto keeps the table it read, however its forwards disagree (costs.ContextCost.observe)
        costs.CHECK_FORWARDS = 10**9
    run_sbd(sbd_model, tokenizer, prompts[0], 8, sbd_caches[0])  # warm-up: allocations, auto's time(rows) measured
    cost = cached_row_cost(sbd_model)  # what auto reads (the same object): measured per context bucket as needed
    names = list(settings)
    runs = {name: [[] for _ in range(rounds)] for name in names}
    with tqdm(total=rounds * len(prompts) * len(names), desc="decoding") as bar:
        for rnd in range(rounds):
            for i, ids in enumerate(prompts):
                order = names[(rnd + i) % len(names):] + names[: (rnd + i) % len(names)]
                for name in order:
                    kw = settings[name]
                    if kw is None:
                        run = run_mlx_lm(sbd_model, tokenizer, ids, max_tokens, lm_caches[i])
                    else:
                        if cold:
                            forget(sbd_model)
                        run = run_sbd(sbd_model, tokenizer, ids, max_tokens, sbd_caches[i], **kw)
                    runs[name][rnd].append(run)
                    bar.update()

    rows_out = []
    base_tps = [sum(r["tokens"] for r in rr) / sum(r["seconds"] for r in rr) for rr in runs["mlx_lm"]]
    for name in names:
        rr = runs[name]
        tps = [sum(r["tokens"] for r in x) / max(sum(r["seconds"] for r in x), 1e-9) for x in rr]
        ratio = [t / b for t, b in zip(tps, base_tps)]
        first = rr[0]
        tokens, nfe = sum(r["tokens"] for r in first), sum(r["nfe"] for r in first)
        all_rows = [n for r in first for n in r["rows"]]
        all_contexts = [c for r in first for c in r["contexts"]]
        lossy = name.startswith("lossy")
        predicted = None if lossy or not all_rows else tokens / sum(cost(n, c) for n, c in zip(all_rows, all_contexts))
        drafted = sum(r.get("drafted", 0) for r in first)
        row = dict(setting=name, tokens=tokens, nfe=nfe, tokens_per_forward=tokens / max(nfe, 1),
                   rows_per_forward=(sum(all_rows) / len(all_rows)) if all_rows else None,
                   acceptance=(sum(r.get("accepted", 0) for r in first) / drafted) if drafted else None,
                   tps=statistics.median(tps), tps_rounds=tps, ratio=statistics.median(ratio), ratio_lo=min(ratio),
                   ratio_hi=max(ratio), predicted_tps=predicted, rescued=sum(r.get("rescued", 0) for r in first),
                   gap=(statistics.median(tps) / predicted - 1) if predicted else None)
        rows_out.append(row)
    fixed = [r for r in rows_out if r["setting"] != "mlx_lm" and not r["setting"].startswith(("auto", "lossy"))]
    best = max(fixed, key=lambda r: r["tps"])
    auto = next(r for r in rows_out if r["setting"].startswith("auto"))

    print(f"\nmachine: {machine()}\ndtype: {sbd_model.lm.model.embed_tokens.weight.dtype}, adapter: "
          f"{adapter_path or 'built-in default'}")
    times = cost.to_dict()
    for c, t in times.items():
        print(f"time(rows) ms over {c} cached tokens: " + ", ".join(f"{r}: {s * 1e3:.1f}" for r, s in t.items()))
    print(f"prompt tokens: {[len(p) for p in prompts]}")
    print(f"{rounds} rounds; x mlx_lm = median over rounds of tok/s over mlx_lm's in the same round [range]")
    print(f"{'setting':16} {'tok/fwd':>7} {'rows/fwd':>8} {'accept':>6} {'tok/s':>7} {'x mlx_lm':>8} {'range':>11} "
          f"{'predicted':>9} {'gap':>6}")
    for r in rows_out:
        rpf = f"{r['rows_per_forward']:8.2f}" if r["rows_per_forward"] else "       -"
        acc = f"{100 * r['acceptance']:5.1f}%" if r["acceptance"] is not None else "     -"
        pred = f"{r['predicted_tps']:9.2f}" if r["predicted_tps"] else "        -"
        gap = f"{100 * r['gap']:+5.1f}%" if r["gap"] is not None else "     -"
        print(f"{r['setting']:16} {r['tokens_per_forward']:7.2f} {rpf} {acc} {r['tps']:7.2f} {r['ratio']:7.3f}x "
              f"{r['ratio_lo']:5.2f}-{r['ratio_hi']:.2f} {pred} {gap}")
    print(f"auto / best fixed ({best['setting']}): {auto['tps'] / best['tps']:.3f} (target >= 0.95)")
    print("rejections rescued by branch rows (round 1): "
          + (", ".join(f"{r['setting']} {r['rescued']}" for r in rows_out if r["rescued"]) or "none"))
    print(f"mask rows' window: {attention.DRAFT_WINDOW} cached keys")
    print(f"time(rows) buckets measured again after checking them against the forwards: {cost.remeasured or 'none'}"
          f"; scaled: {cost.rescaled or 'none'}" + (" (checks off: --no-cost-check)" if no_cost_check else ""))
    save({"machine": machine(), "model": model or "built-in SmolLM2-135M-Instruct", "adapter": adapter_path,
          "draft_window": attention.DRAFT_WINDOW, "max_tokens": max_tokens, "rounds": rounds, "context": context,
          "cold": cold, "heldout": heldout, "prompt_tokens": [len(p) for p in prompts],
          "cost_check": not no_cost_check, "remeasured": cost.remeasured,
          "rescaled": cost.rescaled, "time_rows": times, "rows": rows_out,
          "auto_over_best_fixed": auto["tps"] / best["tps"], "best_fixed": best["setting"],
          "runs": runs}, out)


if __name__ == "__main__":
    from mlx_sbd.backend import preload_openblas_and_reexec

    preload_openblas_and_reexec()
    main()
