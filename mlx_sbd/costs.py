"""time(rows): what one decoding forward costs on this device as a function of its rows, measured once per model
and device and cached, so that drafting can choose how many rows a forward should carry.

Verified decoding's speed is tokens per forward / time(rows). On these CPUs 8 rows cost ~1.3-2x one row; on a
memory-bound GPU about 1x (mlx-examples #1281: on M1/M2 Ultra speculative decoding loses because verification is
not free). The measurement is the decode forward itself (model.forward with the verified mask over a KV cache of
`context` tokens), a few repeats per row count, median.

Rows cost more over a longer cache (a causal row attends to every cached key, a mask row to the last
attention.DRAFT_WINDOW: on these CPUs a forward of 1 causal row and 16 masks costs 2.5x one row over 512 tokens and
2.1x over 8000, one of 4 causal rows and 13 masks 3.0x over 8000; without the window 5.9x, BENCHMARKS 7), so
time(rows) is kept per context bucket (CONTEXTS, 4x apart) and read linearly between buckets:
`ContextCost(rows, context)`, measured with half the rows causal. The first bucket is measured before the first verified
forward; a longer one only when a generation's context first passes the bucket below it, so short chats never pay
for measuring long contexts. The cache's keys and values are random (their values do not change the time), not a
prefill: measuring 4096 tokens costs the forwards, not a 4096-token prefill.

Cache: ~/.cache/mlx_sbd/rows_time/<key>.json (MLX_SBD_CACHE overrides the folder), one file per model and device
holding every bucket measured so far; key = the model's shapes and dtype, the device, the MLX version and the mask
rows' window (attention.DRAFT_WINDOW); delete the file to measure again. A cached table is also checked against the
first verified forwards over each bucket in every process (ContextCost.observe): a machine's speed is not fixed
(power state, other work), and a stale table misprices rows. When they disagree with it by a common factor, at row
counts far enough apart to show the shape, the table is scaled (which changes no choice, and costs nothing);
otherwise it is measured again.
"""

import hashlib
import itertools
import json
import math
import os
import platform
import statistics
import time
import weakref
from bisect import bisect_left
from collections import deque
from pathlib import Path
from typing import Callable, Dict, Optional, Sequence

import mlx.core as mx
import numpy as np

from . import attention
from .attention import BlockMask
from .model import MASK_ID, PerModel

ROWS = (1, 2, 4, 8, 16, 32)
CONTEXTS = (256, 1024, 4096, 16384)  # the context buckets time(rows) is measured at
CHECK_FORWARDS = 8  # verified forwards a bucket's time(rows) is checked against (ContextCost.observe)
CHECK_TOLERANCE = 0.25  # off by more than this (their median ratio), the bucket is scaled or measured again
SHAPE_SPAN = 1.5  # row counts this far apart, both seen, confirm a table's shape (same_shape)
LAYOUT_KINDS = ("linear", "predraft", "branch")  # verified forwards priced apart (ContextCost.layout_scale)
SCALE_FORWARDS = 32  # the latest forwards of each layout whose ratio to the table prices pre-drafting (predraft_scale)
SCALE_MIN = 4


class RowCost:
    """time(rows) in seconds, linear between measured row counts (and flat-extrapolated past the last slope)."""

    def __init__(self, times: Dict[int, float]):
        self.rows = sorted(times)
        # more rows never cost less: a running max irons out timing noise (2 rows "faster" than 1)
        self.times = list(itertools.accumulate((times[r] for r in self.rows), max))

    def __call__(self, rows):
        """Seconds for `rows` (an int, or an array of row counts: an array back)."""
        r, t = self.rows, self.times
        if isinstance(rows, (int, float)):  # one count (every verified forward's check): no array round trip
            if rows <= r[0]:
                return t[0]
            i = min(bisect_left(r, rows), len(r) - 1)  # beyond the measurement: continue the last segment's slope
            return t[i - 1] + (t[i] - t[i - 1]) * (rows - r[i - 1]) / (r[i] - r[i - 1])
        x = np.asarray(rows, dtype=np.float64)
        y = np.interp(x, r, t)
        if len(r) > 1:  # beyond the measurement: continue the last segment's slope
            y = np.where(x > r[-1], t[-1] + (t[-1] - t[-2]) * (x - r[-1]) / (r[-1] - r[-2]), y)
        return float(y) if y.ndim == 0 else y

    def to_dict(self) -> dict:
        return {str(r): t for r, t in zip(self.rows, self.times)}

    def scaled(self, factor: float) -> "RowCost":
        return RowCost({r: t * factor for r, t in zip(self.rows, self.times)})


def same_shape(seen: Sequence[tuple]) -> bool:
    """Whether forwards (rows, seconds / the table's seconds) confirm the table's shape: at least two row counts
    SHAPE_SPAN apart, each seen at least twice, whose median ratios agree within CHECK_TOLERANCE. Then a table off
    by a common factor only missed the device's speed (a power state, other work: these CPUs move +-20% between
    processes), which changes no choice of auto's (it compares rows at one price list) but would cost a measurement
    inside an answer (~4 s here); a table whose shape is wrong (16 rows priced like 8) is measured again."""
    by_rows: Dict[int, list] = {}
    for rows, ratio in seen:
        by_rows.setdefault(rows, []).append(ratio)
    medians = {r: statistics.median(x) for r, x in by_rows.items() if len(x) >= 2}
    if len(medians) < 2 or max(medians) < SHAPE_SPAN * min(medians):
        return False
    return max(medians.values()) <= (1 + CHECK_TOLERANCE) * min(medians.values())


class ContextCost:
    """time(rows, context): a RowCost per context bucket, linear in the context between buckets (attention's work
    grows linearly with it) and never less over a longer context; below the first bucket, its value. With `measure`
    (context -> {rows: seconds}), a bucket is measured the first time a context passes the largest one measured,
    and `save(self)` is called after; without it, the last two buckets' slope continues.

    Checked against the forwards it prices: `observe(rows, context, seconds)` after each verified forward. When
    the median of the first CHECK_FORWARDS forwards' seconds / the table's seconds over a bucket is off by more than
    CHECK_TOLERANCE, that bucket is scaled by that median when the forwards confirm its shape (same_shape), and
    measured again now otherwise (and saved either way): a table measured on another day, on a busier machine or in
    another power state, would otherwise misprice rows for good (in one measured case it priced 16 rows like 8, and
    auto sent 9 rows per forward at 0.89x mlx_lm; BENCHMARKS.md 8). Once per bucket per process, so a generation
    pays for at most one more measurement per bucket."""

    def __init__(self, tables: Dict[int, Dict[int, float]], measure: Optional[Callable[[int], Dict[int, float]]] = None,
                 save: Optional[Callable[["ContextCost"], None]] = None):
        self.tables = {c: RowCost(t) for c, t in tables.items()}
        self.measure, self.save = measure, save
        self.checks: Dict[int, Optional[list]] = {}  # bucket -> (rows, ratio) seen so far; None once checked
        self.remeasured: list = []  # the buckets measured again after a check (for reports and tests)
        self.rescaled: list = []  # the buckets scaled after a check, their shape confirmed by the forwards
        self.recent = {layout: deque(maxlen=SCALE_FORWARDS) for layout in LAYOUT_KINDS}  # ratios to the table
        self.version = 0  # counts the buckets measured: a price read before is stale when it moves

    def observe(self, rows: int, context: int, seconds: float, predraft: bool = False, branch: bool = False) -> None:
        """One verified forward of `rows` rows over `context` cached tokens took `seconds` (see above). Pre-drafting
        forwards and forwards with branch rows are not counted in the check: the table is measured in the linear
        layout, and their masks and per-row positions cost more, which measuring again would not change; their ratio
        to the table's price is kept instead (layout_scale)."""
        layout = "predraft" if predraft else "branch" if branch else "linear"
        ratio = seconds / self(rows, context)
        self.recent[layout].append(ratio)
        if self.measure is None or layout != "linear":
            return
        bucket = max([c for c in self.tables if c <= context] or [min(self.tables)])
        seen = self.checks.setdefault(bucket, [])
        if seen is None:
            return
        seen.append((rows, ratio))
        if len(seen) >= CHECK_FORWARDS:
            self.checks[bucket] = None
            off = statistics.median(r for _, r in seen)
            if abs(math.log(off)) <= math.log(1 + CHECK_TOLERANCE):
                return
            if same_shape(seen):  # the device's speed moved, not the table's shape: scale it, measure nothing
                self.keep(bucket, self.tables[bucket].scaled(off))
                self.rescaled.append(bucket)
            else:
                self.add(bucket)
                self.remeasured.append(bucket)

    def predraft_scale(self) -> float:
        """What a pre-drafting forward costs against a linear forward the table prices the same (layout_scale). A
        pre-drafting forward's span mask and its blocks' positions cost more (on these CPUs ~1.05-1.1x, BENCHMARKS.md
        8), and at 6-9 rows, where a row adds ~2% to a forward, that decides between the layouts."""
        return self.layout_scale("predraft")

    def layout_scale(self, layout: str) -> float:
        """What a forward of `layout` ("predraft", "branch": a linear forward with branch rows) costs against a
        linear forward the table prices the same: the median ratio (seen / table) of its last SCALE_FORWARDS forwards
        over that of the last linear ones; 1 until each kind has been seen SCALE_MIN times. The table is measured in
        the linear layout, where positions are contiguous and the mask is two numbers."""
        linear, other = self.recent["linear"], self.recent[layout]
        if min(len(linear), len(other)) < SCALE_MIN:
            return 1.0
        return statistics.median(other) / statistics.median(linear)

    def add(self, context: int) -> None:
        """Measure the bucket at `context` now (and save)."""
        self.keep(context, RowCost(self.measure(context)))

    def keep(self, context: int, table: RowCost) -> None:
        """`table` is the bucket at `context` from now on (prices read before are stale: version), and saved."""
        self.tables[context] = table
        self.version += 1
        if self.save is not None:
            self.save(self)

    def __call__(self, rows, context: int = 0):
        """Seconds for `rows` (an int, or an array of row counts) over `context` cached tokens."""
        while self.measure is not None and context > max(self.tables) and max(self.tables) < CONTEXTS[-1]:
            self.add(next(c for c in CONTEXTS if c > max(self.tables)))
        contexts = sorted(self.tables)
        if context <= contexts[0] or len(contexts) == 1:
            return self.tables[contexts[0]](rows)
        i = min(bisect_left(contexts, context), len(contexts) - 1)
        (c0, c1) = contexts[i - 1], contexts[i]
        t0 = self.tables[c0](rows)
        t1 = np.maximum(t0, self.tables[c1](rows))
        out = t0 + (t1 - t0) * (context - c0) / (c1 - c0)
        return float(out) if np.ndim(out) == 0 else out

    def to_dict(self) -> dict:
        return {str(c): t.to_dict() for c, t in sorted(self.tables.items())}


def cache_folder() -> Path:
    return Path(os.environ.get("MLX_SBD_CACHE", Path.home() / ".cache" / "mlx_sbd")) / "rows_time"


def model_key(model) -> str:
    args = model.args
    dtype = str(model.lm.model.embed_tokens.weight.dtype)
    shape = {k: getattr(args, k, None) for k in ("model_type", "hidden_size", "num_hidden_layers",
                                                "intermediate_size", "num_attention_heads", "num_key_value_heads",
                                                "vocab_size")}
    device = str(mx.default_device()) + (mx.metal.device_info().get("device_name", "") if mx.metal.is_available() else
                                         platform.processor() + str(os.cpu_count()))
    text = json.dumps([shape, dtype, device, mx.__version__, CONTEXTS, os.environ.get("LD_PRELOAD", ""),
                       attention.DRAFT_WINDOW], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def measure(model, rows: Sequence[int] = ROWS, context: int = 256, repeats: int = 5) -> Dict[int, float]:
    """Median seconds of one verified-layout decode forward over `context` cached tokens, for each row count."""
    cache = filled_cache(model, context)
    # a mask block in the second half, as verified forwards carry
    return {r: time_forward(model, cache, r, r // 2 if r >= 4 else 0, repeats) for r in rows}


def filled_cache(model, context: int):
    """A KV cache holding `context` tokens of random keys and values (shapes and dtype from a one-token forward)."""
    cache = model.make_cache()
    model.lm.model(mx.zeros((1, 1), mx.int32), cache=cache)
    if context > 1:
        for c in cache:
            more = lambda a: mx.random.normal(a.shape[:2] + (context - 1,) + a.shape[3:]).astype(a.dtype)  # noqa: E731
            c.update_and_fetch(more(c.keys), more(c.values))
    mx.eval([(c.keys, c.values) for c in cache])
    return cache


def time_forward(model, cache, rows: int, masks: int, repeats: int) -> float:
    """Median seconds of one decode forward of `rows` rows, the last `masks` of them a mask block, over `cache`
    (left as it was)."""
    x = mx.array([1] * (rows - masks) + [MASK_ID] * masks, mx.int32)  # one sequence, [rows]: as decode.verify_step
    mask = BlockMask(causal_point=rows - masks, window=attention.DRAFT_WINDOW) if masks else "causal"  # as verify_step
    times = []
    for i in range(repeats + 1):  # the first run warms up (graph, allocations) and is not counted
        tic = time.perf_counter()
        h = model.forward(x, mask=mask, cache=cache, return_hidden=True, mask_rows=masks)
        mx.eval(model.logits(h).argmax(axis=-1))
        if i:
            times.append(time.perf_counter() - tic)
        for c in cache:
            c.trim(rows)
    return statistics.median(times)


def row_cost(model, refresh: bool = False) -> ContextCost:
    """time(rows, context) for this model on this device: the buckets cached so far, or the first bucket measured
    now (~a second or two); each bucket measured later (ContextCost.add) is written to the cache file too."""
    path = cache_folder() / f"{model_key(model)}.json"
    tables = {}
    if not refresh:
        try:
            saved = json.loads(path.read_text())["seconds"]
            tables = {int(c): {int(r): float(t) for r, t in times.items()} for c, times in saved.items()}
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            tables = {}

    def save(cost: ContextCost) -> None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps({"seconds": cost.to_dict(), "mlx": mx.__version__}))
            tmp.replace(path)
        except OSError:  # a read-only home: measure again next time, decode anyway
            pass

    model_ref = weakref.ref(model)  # the cost is kept per model (cached_row_cost), and must not keep it alive

    def measure_bucket(context: int) -> Dict[int, float]:
        return measure(model_ref(), context=context, repeats=5 if context <= CONTEXTS[0] else 3)

    cost = ContextCost(tables if CONTEXTS[0] in tables else {}, measure=measure_bucket, save=save)
    if not cost.tables:
        cost.add(CONTEXTS[0])
    return cost


_memo = PerModel()


def cached_row_cost(model) -> Optional[ContextCost]:
    """row_cost once per model object in this process."""
    return _memo.get(model, None, lambda: row_cost(model))
