#!/usr/bin/env bash
# The GPU speed check of issue 13, for a lent CUDA machine (torch, timm, torchmetrics present; no
# smp / mlflow / kfp / dvc / great-expectations / optuna: the benches import none of them).
# About 4 minutes: every step has its own time limit and writes its JSON as it goes, so a step
# cut short still leaves its figures. Results (logs + JSON) go to $OUT.
#
#   OUT=/tmp/out BUSI=.device/busi bash bench/gpu_speed.sh       # on the GPU machine
#   TINY=1 OUT=/tmp/out bash bench/gpu_speed.sh                  # CPU dry run of the same logic
#
# Steps: (1) train_speed eager: m2snet fast vs dense vs msnet, eager and channels-last + fused SGD;
# (2) data_speed: the loader on BUSI (or a demo set) against step 1's model rate; (3) train_speed
# compiled (inductor): m2snet fast and msnet, eager vs compiled, plus the loss-curve check of
# compiled against eager; (4, EXTRA=1) dense compiled, CUDA graphs and the multi-scale plan.
set -uo pipefail
OUT=${OUT:-/tmp/gpu_speed}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
if [ -z "${NO_WHEELS:-}" ] && compgen -G ".whl/*.whl" >/dev/null; then  # pure-python wheels the machine lacks, if any carried
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 M2SNET_OFFLINE=1 HF_HUB_OFFLINE=1

if [ -n "${TINY:-}" ]; then  # logic check on a CPU: tiny sizes, numbers meaningless
  DEV=(--device cpu --threads 1); SIZE=64; BATCH=2; REPEATS=1; WARMUP=1; STEPS=1; NUMERICS=2; WORKERS=(0 2)
  MAX_BATCHES=10
  T_EAGER=900; T_DATA=300; T_COMPILED=900; T_EXTRA=900
else
  DEV=(--device cuda); SIZE=352; BATCH=16; REPEATS=${REPEATS:-5}; WARMUP=2; STEPS=3; NUMERICS=${NUMERICS:-10}
  WORKERS=(0 8); MAX_BATCHES=25; T_EAGER=${T_EAGER:-60}; T_DATA=${T_DATA:-70}; T_COMPILED=${T_COMPILED:-130}
  T_EXTRA=${T_EXTRA:-180}
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
fi
"$PY" -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')" | tee -a "$OUT/gpu.txt"
COMMON=("${DEV[@]}" --size "$SIZE" --batch "$BATCH")
TS=(--repeats "$REPEATS" --steps "$STEPS" --warmup "$WARMUP")

step() {  # step NAME LIMIT_S ARGS...: run one bench under a time limit, log to $OUT/NAME.log
  local name=$1 limit=$2
  shift 2
  echo "=== $name (limit ${limit}s): $*"
  local start=$SECONDS
  timeout -k 5 "$limit" "$PY" "$@" 2>&1 | grep -v -E "it/s|s/it|^\s*$" | tee "$OUT/$name.log"
  local rc=${PIPESTATUS[0]}
  echo "=== $name: exit $rc after $((SECONDS - start)) s" | tee -a "$OUT/$name.log"
}

step train_eager "$T_EAGER" bench/train_speed.py "${COMMON[@]}" "${TS[@]}" \
  --variants m2snet_fast m2snet_dense msnet --modes eager cl_fused --json "$OUT/train_eager.json"

if [ -d "${BUSI:-.device/busi}/benign" ]; then DATA=(--busi "${BUSI:-.device/busi}"); else DATA=(--demo 64); fi
MODEL_FROM=()
[ -f "$OUT/train_eager.json" ] && MODEL_FROM=(--model-from "$OUT/train_eager.json")
step data "$T_DATA" bench/data_speed.py "${DATA[@]}" "${COMMON[@]}" --workers "${WORKERS[@]}" --epochs 2 \
  --max-batches "$MAX_BATCHES" \
  "${MODEL_FROM[@]}" --skip-model --json "$OUT/data.json"

step train_compiled "$T_COMPILED" bench/train_speed.py "${COMMON[@]}" "${TS[@]}" \
  --variants m2snet_fast msnet --modes eager compiled_cl_fused --check-numerics "$NUMERICS" \
  --json "$OUT/train_compiled.json"

if [ -n "${EXTRA:-}" ]; then
  step train_extra "$T_EXTRA" bench/train_speed.py "${COMMON[@]}" "${TS[@]}" \
    --variants m2snet_fast m2snet_dense --modes eager compiled_cl_fused compiled_cg compiled_dynamic \
    --multiscale --json "$OUT/train_extra.json"
fi
echo "total ${SECONDS} s; results in $OUT:"
ls -l "$OUT"
