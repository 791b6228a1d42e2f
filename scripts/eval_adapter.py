"""Evidence for an SBD adapter against its base model, on held-out prompts (paper Tables 1-2 analogue).

    python scripts/eval_adapter.py --data data/smollm2-distill --adapter-path mlx_sbd/adapters/smollm2-135m-instruct-sbd

Measures, with the base model and the SBD model (base + adapter) loaded side by side:
  (a) causal-path NTP loss / perplexity on two held-out texts: the base model's own greedy answers to the test
      prompts (what the adapter was distilled on, for unseen modules) and raw documentation text the base never
      wrote (module docstrings of the test modules, scored as plain text),
  (b) agreement of the SBD model's outputs with the base model's greedy outputs on the test prompts (exact
      answer match and the share of answer tokens before the first difference), exact-match accuracy on held-out
      synthetic tasks (mlx_sbd.tasks) and the share of 40 capital-city questions answered with the right capital
      (CAPITALS), for the base, the SBD model decoded as NTP, and SBD decoding (with ntp_first, the paper's loop,
      or both: --first),
  (c) forwards (NFE) of SBD decoding per k and gamma against NTP decoding of the same model on the same prompts.
Wall-clock tokens/s against mlx_lm.generate is scripts/bench_decode.py. Prints tables; saves raw JSON.
"""

import inspect
import math
import sys
import time
from pathlib import Path

import click
import mlx.core as mx
import mlx.nn as nn
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, save  # noqa: E402
from mlx_sbd.stdlib_text import documented, split_modules  # noqa: E402

import mlx_sbd  # noqa: E402
from mlx_sbd.generate import encode_prompt  # noqa: E402
from mlx_sbd.data import read_jsonl  # noqa: E402
from mlx_sbd.tasks import make_examples, score  # noqa: E402


def answer_loss(model, tokenizer, rows: list) -> dict:
    """Mean causal NTP cross-entropy over the assistant tokens of chat rows (prompt tokens are context only)."""
    total, count = 0.0, 0
    for row in rows:
        prompt = encode_prompt(tokenizer, row["messages"][:1])
        full = list(tokenizer.apply_chat_template(row["messages"], tokenize=True))
        total_row, n = _nll(model, full, start=len(prompt))
        total, count = total + total_row, count + n
    return {"loss": total / count, "ppl": math.exp(total / count), "tokens": count}


def text_loss(model, tokenizer, texts: list) -> dict:
    """Mean causal NTP cross-entropy over plain texts (BOS-less, every token after the first is scored)."""
    total, count = 0.0, 0
    for text in texts:
        total_row, n = _nll(model, tokenizer.encode(text)[:512], start=1)
        total, count = total + total_row, count + n
    return {"loss": total / count, "ppl": math.exp(total / count), "tokens": count}


def _nll(model, ids: list, start: int) -> tuple:
    """Summed NLL of ids[start:] under the causal path; returns (sum, number of scored tokens)."""
    logits = model(mx.array(ids)[None, :-1])[0, start - 1 :]
    nll = nn.losses.cross_entropy(logits.astype(mx.float32), mx.array(ids[start:]), reduction="sum")
    return nll.item(), len(ids) - start


# Short factual questions the base model answers correctly about 70% of the time one token per forward: a task whose
# accuracy SBD decoding can keep or lose (the synthetic tasks are beyond a 135M model). Any accepted name counts.
CAPITALS = [
    ("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Japan", "Tokyo"),
    ("China", "Beijing"), ("Russia", "Moscow"), ("Egypt", "Cairo"), ("Canada", "Ottawa"), ("Australia", "Canberra"),
    ("Brazil", "Brasilia|Brasília"), ("India", "New Delhi"), ("Mexico", "Mexico City"), ("Greece", "Athens"),
    ("Portugal", "Lisbon"), ("Norway", "Oslo"), ("Sweden", "Stockholm"), ("Finland", "Helsinki"),
    ("Denmark", "Copenhagen"), ("Poland", "Warsaw"), ("Austria", "Vienna"), ("Ireland", "Dublin"),
    ("Turkey", "Ankara"), ("Kenya", "Nairobi"), ("Argentina", "Buenos Aires"), ("Peru", "Lima"),
    ("Chile", "Santiago"), ("Thailand", "Bangkok"), ("Vietnam", "Hanoi"), ("South Korea", "Seoul"),
    ("Hungary", "Budapest"), ("Belgium", "Brussels"), ("Netherlands", "Amsterdam"), ("Switzerland", "Bern"),
    ("Cuba", "Havana"), ("Iran", "Tehran"), ("Iraq", "Baghdad"), ("Ukraine", "Kyiv|Kiev"), ("Indonesia", "Jakarta"),
    ("Nigeria", "Abuja"),
]


def capitals_accuracy(texts: list) -> float:
    """Share of answers that name the capital asked for (any accepted spelling, case-insensitive)."""
    right = [any(n.lower() in t.lower() for n in names.split("|")) for t, (_, names) in zip(texts, CAPITALS)]
    return sum(right) / len(CAPITALS)


def decode(model, tokenizer, prompts: list, max_tokens: int, k: int, gamma: float, chat: bool = True,
           ntp_first: bool = True) -> dict:
    """Greedy decoding of every prompt -> texts, token ids, total NFE, generated tokens, seconds."""
    texts, ids, nfe, tokens, tic = [], [], 0, 0, time.perf_counter()
    for p in prompts:
        text, toks, last = "", [], None
        for last in mlx_sbd.stream_generate(model, tokenizer, p, max_tokens=max_tokens, block_size=k, gamma=gamma,
                                            chat_template=chat, ntp_first=ntp_first):
            text += last.text
            toks += last.tokens
        texts.append(text)
        ids.append(toks)
        nfe += last.nfe
        tokens += last.generation_tokens
    return {"texts": texts, "ids": ids, "nfe": nfe, "tokens": tokens, "seconds": time.perf_counter() - tic}


def agreement(ref_ids: list, ids: list) -> dict:
    """Exact-answer agreement and mean share of the reference answer reproduced before the first difference."""
    same, shares = 0, []
    for r, o in zip(ref_ids, ids):
        same += r == o
        prefix = next((i for i, (a, b) in enumerate(zip(r, o)) if a != b), min(len(r), len(o)))
        shares.append(prefix / max(len(r), 1))
    return {"exact": same / len(ref_ids), "prefix_share": sum(shares) / len(shares)}


def raw_doc_texts(seed: int, n: int) -> list:
    """Documentation text of the held-out (test) modules, which the base model never wrote."""
    texts = []
    for name in split_modules(seed)["test"]:
        found = documented(name)
        doc = inspect.getdoc(found[0]) if found else None
        if doc and len(doc) > 200:
            texts.append(doc[:2000])
    return texts[:n]


@click.command()
@click.option("--data", required=True, help="Folder from scripts/make_distill_data.py (test.jsonl is used).")
@click.option("--model", default=None, help="Base model (default: built-in SmolLM2-135M-Instruct).")
@click.option("--adapter-path", required=True)
@click.option("--n-prompts", default=20, show_default=True, help="Held-out chat prompts decoded per setting.")
@click.option("--n-task", default=20, show_default=True, help="Held-out synthetic examples per task.")
@click.option("--max-tokens", default=128, show_default=True)
@click.option("--block-sizes", default="8,16", show_default=True)
@click.option("--gammas", default="0.1,0.35,0.6", show_default=True)
@click.option("--first", type=click.Choice(["ntp", "masked", "both"]), default="ntp", show_default=True,
              help="SBD rows with each block's first open token from the causal prediction (ntp_first, the default "
                   "decoding), from its mask (the paper's loop), or both.")
@click.option("--seed", default=0, show_default=True, help="Seed the data was made with (held-out module split).")
@click.option("--out", default="results/eval_adapter.json", show_default=True)
def main(data, model, adapter_path, n_prompts, n_task, max_tokens, block_sizes, gammas, first, seed, out):
    base, tokenizer = mlx_sbd.load(model, adapter_path=False)
    sbd, _ = mlx_sbd.load(model, adapter_path=adapter_path)
    test = [row for _, row in read_jsonl(Path(data) / "test.jsonl")]
    docs = raw_doc_texts(seed, 40)
    results = {"machine": machine(), "model": model or "built-in SmolLM2-135M-Instruct", "adapter": adapter_path,
               "dtype": str(base.lm.model.embed_tokens.weight.dtype), "max_tokens": max_tokens}

    # (a) causal-path loss
    results["loss"] = {name: {"distilled answers": answer_loss(m, tokenizer, test), "documentation": text_loss(m, tokenizer, docs)}
                       for name, m in (("base", base), ("sbd", sbd))}

    # (b), (c) decoding: chat prompts and synthetic tasks, NTP and SBD
    prompts = [r["messages"][:1] for r in test[:n_prompts]]
    tasks = {t: make_examples(t, 1000 + n_task, seed=seed + 7)[1000:] for t in ("arithmetic", "reverse")}
    questions = [[{"role": "user", "content": f"What is the capital of {c}?"}] for c, _ in CAPITALS]
    firsts = {"ntp": [True], "masked": [False], "both": [True, False]}[first]
    settings = [("base", 1, 0.0, True), ("sbd", 1, 0.0, True)] + [
        ("sbd", int(k), float(g), f) for k in block_sizes.split(",") for g in gammas.split(",") for f in firsts]
    rows = []
    for name, k, g, f in tqdm(settings, desc="decoding settings"):
        m = base if name == "base" else sbd
        chat = decode(m, tokenizer, prompts, max_tokens, k, g, ntp_first=f)
        row = {"model": name, "block_size": k, "gamma": g if k > 1 else None, "ntp_first": f if k > 1 else None,
               "chat": chat, "tasks": {}}
        for t, ex in tasks.items():
            out_t = decode(m, tokenizer, [e["prompt"] for e in ex], 2 * max(len(e["completion"]) for e in ex), k, g,
                           ntp_first=f)
            out_t["accuracy"] = score(out_t["texts"], ex)
            row["tasks"][t] = out_t
        row["capitals"] = decode(m, tokenizer, questions, 32, k, g, ntp_first=f)
        row["capitals"]["accuracy"] = capitals_accuracy(row["capitals"]["texts"])
        rows.append(row)
    ref, own = rows[0]["chat"]["ids"], rows[1]["chat"]["ids"]
    ntp_nfe = rows[1]["chat"]["nfe"]
    for r in rows:
        r["agreement"] = agreement(ref, r["chat"]["ids"])
        r["agreement_own_ntp"] = agreement(own, r["chat"]["ids"])  # with the SBD model's own one-token decoding
        r["speedup"] = ntp_nfe / r["chat"]["nfe"]
        r["tokens_per_forward"] = r["chat"]["tokens"] / r["chat"]["nfe"]
    results["rows"] = rows

    print(f"\nmachine: {results['machine']}\ndtype: {results['dtype']}")
    print("\n(a) causal-path NTP loss (perplexity) on held-out text")
    print(f"{'text':20} {'tokens':>7} {'base':>14} {'sbd':>14} {'change':>7}")
    for text in results["loss"]["base"]:
        b, s = results["loss"]["base"][text], results["loss"]["sbd"][text]
        print(f"{text:20} {b['tokens']:>7} {b['loss']:6.3f} ({b['ppl']:5.2f}) {s['loss']:6.3f} ({s['ppl']:5.2f}) "
              f"{100 * (s['loss'] / b['loss'] - 1):+6.1f}%")
    print(f"\n(b, c) decoding {len(prompts)} held-out chat prompts (agreement with base greedy) and "
          f"{n_task} examples per synthetic task")
    print("same / prefix: vs the base's greedy answers; own prefix: vs the SBD model's own one-token decoding")
    print(f"{'model':5} {'k':>3} {'gamma':>5} {'first':>6} {'tokens':>6} {'NFE':>5} {'tok/fwd':>7} {'speedup':>7} "
          f"{'same':>5} {'prefix':>6} {'own prefix':>10} " + " ".join(f"{t[:10]:>10}" for t in tasks)
          + f" {'capitals':>8}")
    for r in rows:
        g = "-" if r["gamma"] is None else f"{r['gamma']:.2f}"
        f = "-" if r["ntp_first"] is None else ("ntp" if r["ntp_first"] else "masked")
        print(f"{r['model']:5} {r['block_size']:>3} {g:>5} {f:>6} {r['chat']['tokens']:>6} {r['chat']['nfe']:>5} "
              f"{r['tokens_per_forward']:>7.2f} {r['speedup']:>6.2f}x {100 * r['agreement']['exact']:>4.0f}% "
              f"{100 * r['agreement']['prefix_share']:>5.0f}% {100 * r['agreement_own_ntp']['prefix_share']:>9.0f}% "
              + " ".join(f"{100 * r['tasks'][t]['accuracy']:>9.0f}%" for t in tasks)
              + f" {100 * r['capitals']['accuracy']:>7.0f}%")
    save(results, out)


if __name__ == "__main__":
    from mlx_sbd.backend import preload_openblas_and_reexec

    preload_openblas_and_reexec()
    main()
