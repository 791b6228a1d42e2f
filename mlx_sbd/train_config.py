"""Training settings: TrainConfig, its checks (one SBDError naming the flag per bad value), and the adapter_config.json
a run writes. Every setting enters here once; train.py, checkpoints.py and the CLI read it from here."""

import numbers
from dataclasses import asdict, dataclass, field
from typing import Optional

from .errors import SBDError
from .loss import LOSSES, NOISES, TARGETS
from .model import SBDSettings


# What a gated run trains on unless told: the base's own distributions as targets (any text is training data, no
# answers to generate first; BENCHMARKS.md §8 compares it with hard labels on the model's own answers at equal
# wall-clock) on fully masked blocks, the only blocks verified decoding runs.
GATED_DEFAULTS = {"targets": "soft", "noise": "full"}
SELF_DATA = "self"  # --data self: the base model's own answers to built-in prompts (train.self_data, distill.py)


@dataclass
class TrainConfig:
    model: Optional[str] = None  # None: the built-in SmolLM2-135M-Instruct
    # None: built-in text (the standard library's source and docs, stdlib_text); "self": the base model's own answers
    # to built-in prompts (distill.py, made at the start of the run); else a folder of jsonl files
    data: Optional[str] = None
    adapter_path: str = "adapters"
    fine_tune_type: str = "lora"  # lora | dora | full
    objective: str = "sbd"  # sbd | ntp (the baseline: NTP loss only, no MATP term, no noised half)
    num_layers: int = 16  # blocks (from the top) that get LoRA layers; -1 = all
    lora_parameters: dict = field(default_factory=lambda: {"rank": 8, "scale": 20.0, "dropout": 0.0})
    batch_size: int = 4
    iters: int = 1000  # optimizer steps
    learning_rate: float = 1e-4
    min_learning_rate: float = 0.0  # end of the cosine decay
    warmup: int = 100
    weight_decay: float = 0.01
    grad_clip: Optional[float] = None  # clip the global gradient norm to this before each update (None: off)
    block_size_max: int = 16
    max_seq_length: int = 2048
    mask_prompt: Optional[bool] = None  # no loss on prompt tokens; None: on with --data self (its prompts are ours)
    grad_accumulation_steps: int = 1
    grad_checkpoint: bool = False
    steps_per_report: int = 10
    steps_per_eval: int = 200
    val_batches: int = 25  # -1: the whole validation set
    steps_per_save: int = 100
    seed: int = 0
    resume: bool = False
    init_adapter: Optional[str] = None  # start from this adapter folder's weights (a finished run), new schedule
    compile: bool = True  # mx.compile the step; on the CPU back-end the first step pays a ~10-30 s C++ JIT build
    overwrite: bool = False  # a new run into an adapter folder that holds an earlier run deletes that run's files
    # Gated LoRA (adapter.py; None: gated for LoRA/DoRA SBD runs, which is the default; False: the paper's way, --ungated)
    gated: Optional[bool] = None
    shift_blocks: Optional[bool] = None  # random block grid shift per sequence (batches.make_batch); None: = gated
    # What a gated adapter's masked positions learn (loss.TARGETS): the data token, or the base's own next-token
    # distribution ("soft") or its argmax ("base") from the clean half of the same forward. None: GATED_DEFAULTS
    # for gated runs, "data" for the rest (soft and base need the causal path to be the base).
    targets: Optional[str] = None
    # Masking (loss.NOISES): "uniform" = the paper's η ~ U(0, 1) per sequence; "full" = every eligible token masked,
    # the only blocks verified decoding ever runs (a fully masked block after the accepted tokens). None: as targets.
    noise: Optional[str] = None
    # MATP on draft positions only (batches.make_batch): not on the first masked token of a block, whose guess
    # verified decoding never uses (the causal row before it supplies that token). Gated runs only.
    drafts_only: bool = False
    # Stop after this many minutes of training, saving a checkpoint (a stage that fits a session; --resume goes on).
    # The cosine decay then follows whichever runs out first, the steps or the minutes, so a stage stopped by the
    # clock still ends at min_learning_rate.
    time_limit: Optional[float] = None
    # Gated runs: keep each batch's clean half (keys, values, soft targets) in memory after its first epoch, so later
    # epochs skip that forward (clean_cache.py): the same loss, less time, more memory.
    cache_clean: bool = False

    def resolve_gating(self) -> None:
        """Fill in gated / shift_blocks / targets / noise / mask_prompt from the fine-tune type, objective and data
        when they are left unset."""
        if self.gated is None:
            self.gated = self.fine_tune_type in ("lora", "dora") and self.objective == "sbd"
        if self.gated and self.fine_tune_type == "full":
            raise SBDError("a full fine-tune cannot be gated (gating applies LoRA deltas to mask rows); pass --ungated")
        if self.gated and self.objective != "sbd":
            raise SBDError(f"--objective {self.objective} trains the causal path, which a gated adapter leaves alone; "
                           "pass --ungated")
        if self.shift_blocks is None:
            self.shift_blocks = self.gated
        if self.mask_prompt is None:  # the built-in prompts are not the user's text: learn the answers only
            self.mask_prompt = self.data == SELF_DATA
        defaults = GATED_DEFAULTS if self.gated else {"targets": "data", "noise": "uniform"}
        for name, value in defaults.items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        if self.drafts_only and not self.gated:
            raise SBDError("--drafts-only trains a drafter for verified decoding; the paper's (ungated) loop reveals "
                           "every masked position, so drop --drafts-only or --ungated")
        if self.cache_clean and not self.gated:
            raise SBDError("--cache-clean keeps the clean half, which only a gated adapter leaves unchanged between "
                           "epochs; drop --cache-clean or --ungated")
        if self.targets != "data" and not self.gated:
            raise SBDError(f"--targets {self.targets} learns from the base model's own distribution, which only a gated "
                           "adapter leaves unchanged; use --targets data with --ungated")

    def check(self) -> None:
        """Every setting where it enters, once: a value that would run and produce nothing (a NaN learning rate,
        rank 0, no validation batch...) is an SBDError naming its flag."""
        if self.objective not in LOSSES:
            raise SBDError(f"--objective must be one of {', '.join(LOSSES)} (got '{self.objective}')")
        if self.targets is not None and self.targets not in TARGETS:
            raise SBDError(f"--targets must be one of {', '.join(TARGETS)} (got {self.targets!r})")
        if self.noise is not None and self.noise not in NOISES:
            raise SBDError(f"--noise must be one of {', '.join(NOISES)} (got {self.noise!r})")
        for name in INTEGER_SETTINGS:  # a YAML value like `iters: 2.5` or `"100"` is not a count
            if not _is_integer(getattr(self, name)):
                raise SBDError(f"{setting_name(name)} must be an integer (got {getattr(self, name)!r})")
        if self.block_size_max < 2:
            raise SBDError(f"--block-size-max must be at least 2 (got {self.block_size_max})")
        if self.grad_clip is not None and not (_is_number(self.grad_clip) and 0 < self.grad_clip < float("inf")):
            raise SBDError(f"--grad-clip must be a finite number > 0 (got {self.grad_clip!r}); leave it out to not clip")
        for name in ("batch_size", "iters", "grad_accumulation_steps", "steps_per_save", "steps_per_eval",
                     "steps_per_report"):
            if getattr(self, name) < 1:
                raise SBDError(f"{setting_name(name)} must be at least 1 (got {getattr(self, name)})")
        for name in ("learning_rate", "min_learning_rate", "weight_decay"):  # NaN would train a NaN adapter
            value = getattr(self, name)
            if not (_is_number(value) and 0 <= value < float("inf")):
                raise SBDError(f"{setting_name(name)} must be a finite number >= 0 (got {value!r})")
        if self.max_seq_length < 2:  # a sequence needs two tokens for one next-token label
            raise SBDError(f"--max-seq-length must be at least 2 (got {self.max_seq_length})")
        if self.val_batches == 0 or self.val_batches < -1:
            raise SBDError(f"--val-batches must be at least 1, or -1 for the whole validation set (got "
                           f"{self.val_batches}); to skip validation, leave valid.jsonl out of the data folder")
        if self.warmup < 0:
            raise SBDError(f"--warmup must be >= 0 (got {self.warmup})")
        if self.time_limit is not None and not (_is_number(self.time_limit) and 0 < self.time_limit < float("inf")):
            raise SBDError(f"--time-limit must be a number of minutes > 0 (got {self.time_limit!r})")
        if self.resume and self.overwrite:
            raise SBDError("--resume continues the run in --adapter-path and --overwrite deletes it: give only one")
        if not isinstance(self.lora_parameters or {}, dict):
            raise SBDError(f"lora_parameters must be a mapping of rank, scale, dropout (got {self.lora_parameters!r})")
        self.lora_parameters = {"rank": 8, "scale": 20.0, "dropout": 0.0, **(self.lora_parameters or {})}
        check_lora_parameters(self.lora_parameters)


def adapter_config(cfg: TrainConfig, model) -> dict:
    n = len(model.layers) if cfg.num_layers < 0 else min(cfg.num_layers, len(model.layers))
    training = {k: v for k, v in asdict(cfg).items() if k not in ("resume", "compile")}
    return {
        "fine_tune_type": cfg.fine_tune_type,
        "gated": bool(cfg.gated),
        "num_layers": n,
        "lora_parameters": cfg.lora_parameters,
        "sbd": {**SBDSettings(block_size_max=cfg.block_size_max, block_size=cfg.block_size_max).to_dict(),
                "training": training},
    }


# ---------------------------------------------------------------- how settings are named and checked
INTEGER_SETTINGS = ("num_layers", "batch_size", "iters", "warmup", "block_size_max", "max_seq_length",
                    "grad_accumulation_steps", "steps_per_report", "steps_per_eval", "val_batches", "steps_per_save",
                    "seed")
FLAG_NAMES = {"steps_per_save": "--save-every", "gated": "gated (--ungated)"}  # flag is not --<name with dashes>
NO_FLAG = ("objective", "min_learning_rate", "weight_decay", "shift_blocks")  # config-file (-c) keys only


def setting_name(name: str) -> str:
    """How the user set `name`: its flag, or its key in the -c config file when it has no flag."""
    if name in NO_FLAG:
        return f"{name} (in the -c config file)"
    return FLAG_NAMES.get(name, "--" + name.replace("_", "-"))


def _is_number(value) -> bool:  # numpy scalars count, bools do not
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _is_integer(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_lora_parameters(params: dict) -> None:
    rank, scale, dropout = params.get("rank"), params.get("scale"), params.get("dropout")
    if not _is_integer(rank) or rank < 1:
        raise SBDError(f"--lora-rank must be an integer >= 1 (got {rank!r})")
    if not (_is_number(scale) and abs(scale) < float("inf")):
        raise SBDError(f"--lora-scale must be a finite number (got {scale!r})")
    if not (_is_number(dropout) and 0 <= dropout < 1):
        raise SBDError(f"--lora-dropout must be in [0, 1) (got {dropout!r})")
