"""The first answer of a process whose cached time(rows) table is off by a common factor (scaled by --factor, as if
measured on a faster or slower day): its time, and what the cost check did (costs.ContextCost.observe), under the
current rule (a table the forwards confirm in shape is scaled) and with a re-measure forced (the rule before). Each
run is a fresh process with its own cache folder holding a scaled copy of this machine's table (measured first if
there is none); rounds alternate the two rules.

    python scripts/bench_stale_table.py --rounds 2
"""

import json
import os
import subprocess
import sys
import tempfile
import time

import click
from common import machine, save

CHILD = """
import json, os, sys, time
import mlx_sbd
from mlx_sbd import costs
from mlx_sbd.heldout import heldout_prompts
rule, factor, max_tokens, table = sys.argv[1], float(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
if rule == "remeasure":
    costs.same_shape = lambda seen: False
model, tokenizer = mlx_sbd.load()
real = json.load(open(table))
folder = os.path.join(os.environ["MLX_SBD_CACHE"], "rows_time")
os.makedirs(folder, exist_ok=True)
with open(os.path.join(folder, os.path.basename(table)), "w") as f:
    json.dump({"seconds": {c: {r: t * factor for r, t in times.items()} for c, times in real["seconds"].items()},
               "mlx": real["mlx"]}, f)
ids = heldout_prompts(tokenizer, 1, kinds=["chat"])["chat"][0]
tic = time.perf_counter()
for r in mlx_sbd.stream_generate(model, tokenizer, ids, max_tokens=max_tokens):
    pass
cost = costs.cached_row_cost(model)
print("RESULT " + json.dumps({"rule": rule, "seconds": time.perf_counter() - tic, "tokens": r.generation_tokens,
                              "forwards": r.nfe, "rescaled": cost.rescaled, "remeasured": cost.remeasured}))
"""


@click.command()
@click.option("--factor", default=0.6, show_default=True, help="The cached table's seconds times this.")
@click.option("--rounds", default=2, show_default=True)
@click.option("--max-tokens", default=128, show_default=True)
@click.option("--out", default="results/bench_stale_table.json", show_default=True)
def main(factor, rounds, max_tokens, out):
    import mlx_sbd
    from mlx_sbd import costs

    model, _ = mlx_sbd.load()
    costs.cached_row_cost(model)  # this machine's table, measured now if it is not cached yet
    table = str(costs.cache_folder() / f"{costs.model_key(model)}.json")
    del model
    runs = []
    for _ in range(rounds):
        for rule in ("scale", "remeasure"):
            with tempfile.TemporaryDirectory() as folder:
                env = {**os.environ, "MLX_SBD_CACHE": folder}
                done = subprocess.run([sys.executable, "-c", CHILD, rule, str(factor), str(max_tokens), table],
                                      env=env, capture_output=True, text=True, check=True)
            line = next(x for x in done.stdout.splitlines() if x.startswith("RESULT "))
            runs.append(json.loads(line[len("RESULT "):]))
            r = runs[-1]
            print(f"{rule:10s} first answer {r['seconds']:6.2f} s ({r['tokens']} tokens, {r['forwards']} forwards); "
                  f"scaled {r['rescaled'] or '-'}, measured again {r['remeasured'] or '-'}", flush=True)
    save({"machine": machine(), "factor": factor, "max_tokens": max_tokens, "date": time.strftime("%Y-%m-%d %H:%M"),
          "runs": runs}, out)


if __name__ == "__main__":
    from mlx_sbd.backend import preload_openblas_and_reexec

    preload_openblas_and_reexec()
    main()
