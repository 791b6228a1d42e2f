"""Copy a trained SBD adapter into the package as the built-in model's default (mlx_sbd/adapters/...).

The LoRA weights are stored in float16 (half the size; load_adapter casts them back to the compute dtype) and the
recommended decoding settings, chosen from scripts/eval_adapter.py and scripts/bench_decode.py, are written into
the "sbd" section of adapter_config.json, where `mlx-sbd generate` and `model.sbd` read them.

    python scripts/ship_adapter.py adapters/smollm2-135m-instruct-sbd --block-size 8 --gamma 0.35 \
        --recipe mlx_sbd/adapters/smollm2-135m-instruct-sbd/train_stage2.yaml
"""

import json
import sys
from pathlib import Path

import click
import mlx.core as mx
import yaml

from mlx_sbd.adapter import ADAPTER_CONFIG, copy_adapter
from mlx_sbd.loading import DEFAULT_ADAPTER


@click.command()
@click.argument("adapter", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--block-size", required=True, type=int, help="Recommended decode block size.")
@click.option("--gamma", required=True, type=float, help="Recommended EB-Sampler budget.")
@click.option("--dest", default=str(DEFAULT_ADAPTER), show_default=True, type=click.Path(path_type=Path))
@click.option("--recipe", default=None, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="The training YAML of the run: its data / adapter_path / init_adapter replace the machine-local "
                   "paths recorded in the adapter's config.")
def main(adapter, block_size, gamma, dest, recipe):
    config = json.loads((adapter / ADAPTER_CONFIG).read_text())
    if recipe is not None:
        recipe_settings = yaml.safe_load(recipe.read_text())
        training = config["sbd"].setdefault("training", {})
        for key in ("data", "adapter_path", "init_adapter"):
            if key in recipe_settings:
                training[key] = recipe_settings[key]
    if block_size > config["sbd"]["block_size_max"]:
        sys.exit(f"--block-size {block_size} exceeds the trained block_size_max {config['sbd']['block_size_max']}")
    sbd = {**config["sbd"], "block_size": block_size, "gamma": gamma}
    copy_adapter(adapter, dest, dtype=mx.float16, sbd=sbd)
    size = sum(f.stat().st_size for f in dest.iterdir()) / 1e6
    print(f"{dest}: block_size={block_size}, gamma={gamma}, {size:.1f} MB")


if __name__ == "__main__":
    main()
