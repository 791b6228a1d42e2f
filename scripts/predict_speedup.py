"""The speedup verified decoding would give on another device: tokens per forward measured here (on real weights,
hardware-independent) combined with that device's time(rows) (scripts/bench_rows.py run there).

    tokens/s = tokens per forward / time(rows per forward);  x one-token = tokens/s * time(1);  x mlx_lm = tokens/s *
    mlx_lm's seconds per token (its own pipelined loop, on that device)

Also the break-even: the tokens per forward a setting needs on that device to match one-token decoding,
time(rows) / time(1). Prints a table, saves JSON.

    python scripts/predict_speedup.py --rows results/bench_rows_h200.json \
        --drafts results/eval_drafts_linear.json --drafts results/eval_drafts_predraft.json
"""

import json
import sys
from pathlib import Path

import click

sys.path.insert(0, str(Path(__file__).parent))
from common import save  # noqa: E402

from mlx_sbd.costs import RowCost  # noqa: E402

# Published for comparison: Apple's gated LoRA on an 8B model, tokens per step (arXiv 2507.11851), at 16 rows.
REFERENCE = [("published 8B gated LoRA, chat", 2.5, 16), ("published 8B gated LoRA, code", 5.0, 16)]


@click.command()
@click.option("--rows", "rows_json", required=True, help="bench_rows.py output (time(rows) on the device).")
@click.option("--drafts", "drafts_json", multiple=True, required=True,
              help="eval_drafts.py output (tokens and rows per forward measured here); repeatable.")
@click.option("--out", default="results/predict_speedup.json", show_default=True)
def main(rows_json, drafts_json, out):
    device = json.loads(Path(rows_json).read_text())
    settings = list(REFERENCE)
    for path in drafts_json:
        d = json.loads(Path(path).read_text())
        layout, k = d.get("layout", "linear"), d.get("block_size") or 8
        for r in d["rows"]:
            if r["kind"] != "all":
                settings.append((f"{r['adapter']} {layout} k={k}, {r['kind']}", r["tokens_per_forward"],
                                 r["rows_per_forward"]))
    table = []
    print(f"device: {device['device']} ({device['machine'].get('backend')}), {device['dtype']}")
    print(f"{'model':14} {'context':>7} {'setting':44} {'tok/fwd':>7} {'rows':>6} {'break-even':>10} "
          f"{'x 1-token':>9} {'x mlx_lm':>8}")
    for model, by_context in device["models"].items():
        for context, entry in by_context.items():
            cost = RowCost({int(r): t for r, t in entry["seconds"].items()})
            for name, tpf, rows in settings:
                t = cost(rows)
                row = dict(model=model, context=int(context), setting=name, tokens_per_forward=tpf,
                           rows_per_forward=rows, break_even=t / cost(1), x_one_token=tpf * cost(1) / t,
                           x_mlx_lm=tpf * entry["mlx_lm_per_token_s"] / t)
                table.append(row)
                print(f"{model:14} {context:>7} {name:44} {tpf:7.2f} {rows:6.1f} {row['break_even']:10.2f} "
                      f"{row['x_one_token']:8.2f}x {row['x_mlx_lm']:7.2f}x")
    save({"rows_json": rows_json, "drafts_json": list(drafts_json), "device": device["device"], "table": table}, out)


if __name__ == "__main__":
    main()
