"""time(rows): what one decoding forward costs on this device as a function of its rows, measured once per model
and device and cached, so that drafting can choose how many rows a forward should carry.

Verified decoding's speed is tokens per forward / time(rows). On these CPUs 8 rows cost ~1.3-2x one row; on a
memory-bound GPU about 1x (mlx-examples #1281: on M1/M2 Ultra speculative decoding loses because verification is
not free). The measurement is the decode forward itself (model.forward with the verified mask over a KV cache of
`context` tokens), a few repeats per row count, median.

Cache: ~/.cache/mlx_sbd/rows_time/<key>.json (MLX_SBD_CACHE overrides the folder), key = the model's shapes and
dtype, the device and the MLX version; delete the file to measure again.
"""

import hashlib
import itertools
import json
import os
import platform
import statistics
import time
from bisect import bisect_left
from pathlib import Path
from typing import Dict, Optional, Sequence

import mlx.core as mx

from .attention import BlockMask
from .model import MASK_ID

ROWS = (1, 2, 4, 8, 16, 32)


class RowCost:
    """time(rows) in seconds, linear between measured row counts (and flat-extrapolated past the last slope)."""

    def __init__(self, times: Dict[int, float]):
        self.rows = sorted(times)
        # more rows never cost less: a running max irons out timing noise (2 rows "faster" than 1)
        self.times = list(itertools.accumulate((times[r] for r in self.rows), max))

    def __call__(self, rows: int) -> float:
        r, t = self.rows, self.times
        if rows <= r[0]:
            return t[0]
        i = bisect_left(r, rows)
        if i == len(r):  # beyond the measurement: continue the last segment's slope
            i = len(r) - 1
        (r0, t0), (r1, t1) = (r[i - 1], t[i - 1]), (r[i], t[i])
        return t0 + (t1 - t0) * (rows - r0) / (r1 - r0)

    def to_dict(self) -> dict:
        return {str(r): t for r, t in zip(self.rows, self.times)}


def cache_folder() -> Path:
    return Path(os.environ.get("MLX_SBD_CACHE", Path.home() / ".cache" / "mlx_sbd")) / "rows_time"


def model_key(model, context: int) -> str:
    args = model.args
    dtype = str(model.lm.model.embed_tokens.weight.dtype)
    shape = {k: getattr(args, k, None) for k in ("model_type", "hidden_size", "num_hidden_layers",
                                                "intermediate_size", "num_attention_heads", "num_key_value_heads",
                                                "vocab_size")}
    device = str(mx.default_device()) + (mx.metal.device_info().get("device_name", "") if mx.metal.is_available() else
                                         platform.processor() + str(os.cpu_count()))
    text = json.dumps([shape, dtype, device, mx.__version__, context, os.environ.get("LD_PRELOAD", "")], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def measure(model, rows: Sequence[int] = ROWS, context: int = 256, repeats: int = 5) -> Dict[int, float]:
    """Median seconds of one verified-layout decode forward over `context` cached tokens, for each row count."""
    cache = model.make_cache()
    model.lm.model(mx.zeros((1, context), mx.int32), cache=cache)  # the context: K/V of `context` tokens
    mx.eval([c.state for c in cache])
    # a mask block in the second half, as verified forwards carry
    return {r: time_forward(model, cache, r, r // 2 if r >= 4 else 0, repeats) for r in rows}


def time_forward(model, cache, rows: int, masks: int, repeats: int) -> float:
    """Median seconds of one decode forward of `rows` rows, the last `masks` of them a mask block, over `cache`
    (left as it was)."""
    x = mx.array([1] * (rows - masks) + [MASK_ID] * masks, mx.int32)  # one sequence, [rows]: as decode.verify_step
    mask = BlockMask(causal_point=rows - masks) if masks else "causal"
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


def row_cost(model, context: int = 256, refresh: bool = False) -> RowCost:
    """time(rows) for this model on this device: from the cache, or measured now (~a second or two) and cached."""
    path = cache_folder() / f"{model_key(model, context)}.json"
    if not refresh:
        try:
            return RowCost({int(r): float(t) for r, t in json.loads(path.read_text())["seconds"].items()})
        except (OSError, ValueError, KeyError, TypeError):
            pass
    times = measure(model, context=context)
    cost = RowCost(times)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"seconds": cost.to_dict(), "context": context, "mlx": mx.__version__}))
        tmp.replace(path)
    except OSError:  # a read-only home: measure again next time, decode anyway
        pass
    return cost


_memo: Dict[int, RowCost] = {}


def cached_row_cost(model) -> Optional[RowCost]:
    """row_cost once per model object in this process."""
    if id(model) not in _memo:
        _memo[id(model)] = row_cost(model)
    return _memo[id(model)]
