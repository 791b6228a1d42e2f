"""Tokens per forward of verified decoding with each adapter's drafts alone, on held-out chat and code prompts.

The prompts come from the standard library modules held out of every training set this project builds
(mlx_sbd.heldout); decoding is greedy, verified, draft="sbd", gamma=inf (every block position drafted), so the
number measures the adapter. Prints a table and writes the raw numbers as JSON. With --record, each adapter's
drafts' acceptance per position (chat and code together) is written into its config, as `mlx-sbd train` does
after training: --draft auto starts from it.

    python scripts/eval_drafts.py --adapter gated=mlx_sbd/adapters/smollm2-135m-instruct-sbd-gated --n 12
"""

import time

import click
from common import machine, save

import mlx_sbd
from mlx_sbd.adapter import record_draft_acceptance
from mlx_sbd.heldout import KINDS, heldout_prompts, measure, pooled


@click.command()
@click.option("--adapter", "adapters", multiple=True, required=True, help="name=folder (repeatable).")
@click.option("--model", default=None, help="Base model. Default: the built-in SmolLM2-135M-Instruct.")
@click.option("--n", default=12, show_default=True, help="Prompts of each kind.")
@click.option("--max-tokens", default=64, show_default=True)
@click.option("--block-size", default=None, type=int, help="Default: the adapter's.")
@click.option("--layout", default="linear", show_default=True, type=click.Choice(["linear", "predraft"]),
              help="predraft: a mask block after each draft, so every forward has drafts (more rows per forward).")
@click.option("--draft", default="sbd", show_default=True, type=click.Choice(["sbd", "both"]),
              help="both: prompt lookup's drafts where the mask block has none valid (e.g. after a rejection).")
@click.option("--branch", default=None, type=click.IntRange(min=0), help="Branch rows per forward (the mask block's "
              "next-best guesses beside its drafts, the likeliest N); the output then shows how often a row of each "
              "rank and draft position rescued a rejection (drafting.RESCUE_PRIOR's measurement).")
@click.option("--kinds", default=",".join(KINDS), show_default=True)
@click.option("--out", default="results/eval_drafts.json", show_default=True)
@click.option("--record", is_flag=True, help="Write each adapter's measured acceptance per draft position into its "
              "adapter_config.json (--draft auto's starting estimate).")
def main(adapters, model, n, max_tokens, block_size, layout, draft, branch, kinds, out, record):
    if record and draft != "sbd":
        raise click.UsageError("--record writes the mask block's own acceptance: measure it with --draft sbd")
    if record and branch:
        raise click.UsageError("--record writes the mask block's own acceptance: measure it without --branch (a "
                               "branch row's drafts would count as the block's)")
    rows = []
    prompts = None
    rescues = RescueCounts() if branch else None
    for spec in adapters:
        name, _, path = spec.partition("=")
        m, tokenizer = mlx_sbd.load(model, adapter_path=path)
        if prompts is None:
            prompts = heldout_prompts(tokenizer, n, kinds=kinds.split(","))
        for kind, ids in prompts.items():
            tic = time.perf_counter()
            if rescues is not None:
                rescues.reset()
            r = measure(m, tokenizer, ids, max_tokens=max_tokens, block_size=block_size, layout=layout, draft=draft,
                        branch=branch)
            if rescues is not None:
                r.update(branch_rows_sent={f"{j},{rr}": v for (j, rr), v in rescues.sent.items()},
                         branch_rows_rescued={f"{j},{rr}": v for (j, rr), v in rescues.hits.items()},
                         rescue_rate=rescues.table())
            r.update(adapter=name, path=path, kind=kind, seconds=time.perf_counter() - tic)
            rows.append(r)
            print(f"{name:24s} {kind:5s} tokens/forward {r['tokens_per_forward']:.2f}  ({r['tokens']} tokens, "
                  f"{r['forwards']} forwards, {r['rows_per_forward']:.1f} rows/forward, {r['seconds']:.0f} s)"
                  + (f"; rescued {r['rescued']}; rescues per branch row by rank, position: {r['rescue_rate']}" if branch
                     else ""),
                  flush=True)
        both = pooled([r for r in rows if r["adapter"] == name])
        print(f"{name:24s} acceptance per draft position: {both['draft_acceptance']}")
        rows.append({"adapter": name, "path": path, "kind": "all", **both})
        if record:
            record_draft_acceptance(path, both["draft_acceptance"])
            print(f"recorded in {path}")
    save({"machine": machine(), "n": n, "max_tokens": max_tokens, "block_size": block_size, "layout": layout,
          "draft": draft, "branch": branch, "rows": rows}, out)
    print(f"raw results -> {out}")


class RescueCounts:
    """Branch rows sent and rescues per (draft position, rank), as every Drafter of this process records them."""

    def __init__(self):
        from mlx_sbd.drafting import Drafter

        self.sent, self.hits = {}, {}
        real = Drafter.record_alternatives

        def record(drafter, rows, rescued):
            for i, (j, r) in enumerate(rows):
                self.sent[j, r] = self.sent.get((j, r), 0) + 1
                self.hits[j, r] = self.hits.get((j, r), 0) + (i == rescued)
            real(drafter, rows, rescued)

        Drafter.record_alternatives = record

    def reset(self):
        self.sent, self.hits = {}, {}

    def table(self) -> dict:
        """{"rank r": [rescues / rows sent at draft position j, ...]} (positions with rows sent)."""
        ranks = sorted({r for _, r in self.sent})
        out = {}
        for r in ranks:
            js = sorted(j for j, rr in self.sent if rr == r)
            out[f"rank {r}"] = [round(self.hits[j, r] / self.sent[j, r], 4) for j in js]
        return out


if __name__ == "__main__":
    from mlx_sbd.backend import preload_openblas_and_reexec

    preload_openblas_and_reexec()
    main()
