"""`mlx-sbd train`: SBD fine-tuning (LoRA / DoRA / QLoRA on a quantized base / full) from a jsonl folder.

Settings come from TrainConfig's defaults, then the YAML file given with -c (keys = TrainConfig field names,
as in mlx_lm's config files), then the flags actually given on the command line.
"""

import dataclasses
import re

import click

from ..errors import SBDError

LORA_FLAGS = {"lora_rank": "rank", "lora_scale": "scale", "lora_dropout": "dropout"}
YAML_FLOAT = re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?|[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
    |\.[0-9_]+(?:[eE][-+][0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$""", re.X)


@click.command("train")
@click.option("--model", default=None, help="Base model (HF repo, folder or .gguf). Default: built-in SmolLM2-135M-Instruct.")
@click.option("--data", default=None, help="Folder with train.jsonl (and valid.jsonl, test.jsonl), or `self`: the base model's own greedy answers to built-in prompts about the Python standard library and everyday topics (self-distillation: 1584 answers of up to 128 tokens made first, with mlx_lm's batch_generate, into <adapter-path>/data_self; kept as they are made, so a rerun continues; prompts out of the loss). Default: none, built-in text (the standard library's own source and docs, written to <adapter-path>/data), labelled by the base model itself (--targets soft)")
@click.option("--adapter-path", default=None, help="Where the adapter and its checkpoints go. Default: adapters")
@click.option("--fine-tune-type", default=None, type=click.Choice(["lora", "dora", "full"]), help="Default: lora")
@click.option("--num-layers", default=None, type=int, help="Blocks (from the top) that get LoRA layers; -1 = all. Default: 16")
@click.option("--lora-rank", default=None, type=int, help="LoRA rank. Default: 8")
@click.option("--lora-scale", default=None, type=float, help="LoRA scale. Default: 20.0")
@click.option("--lora-dropout", default=None, type=float, help="LoRA dropout. Default: 0.0")
@click.option("--batch-size", default=None, type=int, help="Sequences per micro-batch (the global batch: split evenly over the processes under mlx.launch). Default: 4")
@click.option("--iters", default=None, type=int, help="Optimizer steps. Default: 1000")
@click.option("--learning-rate", default=None, type=float, help="Peak AdamW learning rate (warmup, then cosine). Default: 1e-4")
@click.option("--grad-clip", default=None, type=float, help="Clip the global gradient norm to this before each update (the log's grad_norm is before clipping). Default: off")
@click.option("--warmup", default=None, type=int, help="Warmup steps. Default: 100")
@click.option("--block-size-max", default=None, type=int, help="Training block size k ~ U{2..this} per step. Default: 16")
@click.option("--max-seq-length", default=None, type=int, help="Longer sequences are truncated. Default: 2048")
@click.option("--mask-prompt", is_flag=True, default=None, help="No loss on prompt tokens. Default: on with --data self, else off")
@click.option("--grad-accumulation-steps", default=None, type=int, help="Micro-batches per optimizer step. Default: 1")
@click.option("--grad-checkpoint", is_flag=True, default=None, help="Recompute each block's activations in the backward pass (less memory, more compute).")
@click.option("--steps-per-report", default=None, type=int, help="Default: 10")
@click.option("--steps-per-eval", default=None, type=int, help="Default: 200")
@click.option("--val-batches", default=None, type=int, help="Validation batches (-1 = all). Default: 25")
@click.option("--save-every", "steps_per_save", default=None, type=int, help="Checkpoint every N steps. Default: 100")
@click.option("--time-limit", default=None, type=float, help="Stop after this many minutes of training, saving a checkpoint (a stage that fits a session; --resume continues). The cosine decay follows whichever runs out first, steps or minutes. Default: none")
@click.option("--seed", default=None, type=int, help="Seed for data order, noise and LoRA init. Default: 0")
@click.option("--resume", is_flag=True, default=None, help="Continue from the latest checkpoint in --adapter-path (made with the same settings; --iters may change).")
@click.option("--overwrite", is_flag=True, default=None, help="Start a new run in an --adapter-path that holds an earlier run, deleting its adapter, checkpoints and log.")
@click.option("--init-adapter", default=None, help="Start from this adapter folder's weights (same LoRA shape), with a fresh optimizer and schedule.")
@click.option("--no-compile", "no_compile", is_flag=True, default=None, help="Run the step eagerly (skips mx.compile).")
@click.option("--ungated", is_flag=True, default=None, help="Train the paper's way: LoRA on every row, which changes the causal path too. Default: gated LoRA (mask-block rows only; the causal path stays the base model, so verified decoding gives the base model's output).")
@click.option("--targets", default=None, type=click.Choice(["data", "soft", "base"]), help="What a gated adapter's masked positions learn: the data token, or the base model's own next-token distribution (soft) or its argmax (base), read off the clean half of the same forward, so any text trains it. Default: soft for gated runs, data with --ungated")
@click.option("--noise", default=None, type=click.Choice(["uniform", "full"]), help="Masking: the paper's rate eta ~ U(0,1) per sequence (uniform), or every answer token masked (full: the only blocks verified decoding runs). Default: full for gated runs, uniform with --ungated")
@click.option("--drafts-only", "drafts_only", is_flag=True, default=None, help="Gated runs: no MATP loss on the first masked token of each block, whose guess verified decoding never uses (the causal row supplies that token), only on the later ones, the drafts.")
@click.option("--cache-clean", "cache_clean", is_flag=True, default=None, help="Gated runs: keep each batch's clean half (the base model's keys and values and the soft targets, which the adapter never changes) in memory after its first epoch, so later epochs skip that forward: the same loss, faster steps when the data is seen more than once. Memory per token: layers x 2 x kv_heads x head_dim x 4 bytes, plus 4 x hidden with soft targets (SmolLM2-135M: 48 KB), estimated and checked at the start.")
@click.option("--heldout", default=8, show_default=True, type=int, help="After training, measure the adapter's tokens per forward (verified greedy decoding, its own drafts) on this many held-out prompts of each kind (chat and code about held-out standard-library modules, general chat on held-out topics); 0 skips.")
@click.option("-c", "--config", "config_file", default=None, type=click.Path(), help="YAML file of TrainConfig settings.")
def command(config_file, no_compile, ungated, heldout, **flags):
    """Fine-tune a Llama/Qwen model with the SBD objective (NTP + masked-block prediction)."""
    from ..train import TrainConfig, train

    settings = read_yaml(config_file) if config_file else {}
    lora = dict(settings.pop("lora_parameters", None) or {})
    for flag, key in LORA_FLAGS.items():
        if flags.get(flag) is not None:
            lora[key] = flags[flag]
        flags.pop(flag)
    settings.update({k: v for k, v in flags.items() if v is not None})
    if no_compile:
        settings["compile"] = False
    if ungated:
        settings["gated"] = False
    if lora:
        settings["lora_parameters"] = lora
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(settings) - known)
    if unknown:
        raise SBDError(f"unknown training setting(s) {unknown} in {config_file}; valid keys: {sorted(known)}")
    cfg = TrainConfig(**settings)
    train(cfg)
    import mlx.core as mx

    if mx.distributed.init().rank() != 0:  # under mlx.launch: one report, not one per process
        return
    click.echo(f"Adapter written to {cfg.adapter_path}")
    if heldout > 0 and cfg.objective == "sbd":
        click.echo(heldout_line(cfg, heldout))


def heldout_line(cfg, n: int) -> str:
    """What the new adapter gives, measured: tokens per forward on held-out prompts (mlx_sbd.heldout). The drafts'
    acceptance per position is written into the adapter, as --draft auto's starting estimate."""
    from ..adapter import record_draft_acceptance
    from ..heldout import KINDS, heldout_prompts, measure, pooled
    from ..loading import load

    model, tokenizer = load(cfg.model, adapter_path=cfg.adapter_path)
    parts, results = [], []
    heldout = heldout_prompts(tokenizer, n)
    for kind, prompts in heldout.items():
        results.append(measure(model, tokenizer, prompts, max_tokens=64))
        parts.append(f"{results[-1]['tokens_per_forward']:.2f} on {kind}")
    record_draft_acceptance(cfg.adapter_path, pooled(results)["draft_acceptance"])
    same = "the base model's output, token for token" if cfg.gated else "the adapter's own one-token output"
    line = (f"Held-out prompts ({', '.join(f'{n} {kind}' for kind in KINDS)}, 64 tokens each): tokens per forward "
            f"of verified decoding with the adapter's drafts: {', '.join(parts)} (greedy output: {same})")
    if model.corpus is not None:  # --data self wrote the base's answers as a draft corpus: what it adds
        both = {kind: measure(model, tokenizer, prompts, max_tokens=64, draft="both")["tokens_per_forward"]
                for kind, prompts in heldout.items()}
        line += ("; with prompt lookup and the draft corpus where the mask block has none valid: "
                 + ", ".join(f"{x:.2f} on {kind}" for kind, x in both.items()))
    return line


def read_yaml(path) -> dict:
    import yaml

    class Loader(yaml.SafeLoader):  # as mlx_lm reads its config files: `1e-4` is a number, not a string
        pass

    Loader.add_implicit_resolver("tag:yaml.org,2002:float", YAML_FLOAT, list("-+0123456789."))
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.load(f, Loader=Loader) or {}
    except FileNotFoundError:
        raise SBDError(f"config file not found: {path}") from None
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        reason = " ".join(str(e).split())
        raise SBDError(f"{path} is not valid YAML: {reason}") from None
    except OSError as e:
        raise SBDError(f"cannot read config file {path}: {e.strerror or e}") from None
    if not isinstance(data, dict):
        raise SBDError(f"{path} must be a mapping of setting: value")
    return data
