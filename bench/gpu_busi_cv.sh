#!/usr/bin/env bash
# One short GPU check, for a lent CUDA machine that has torch/timm/torchmetrics but not the rest of
# the stack: installs the two extra wheels carried in .whl/, then runs the BUSI 4-fold bench at 352 px.
# Usage (repo root): EPOCHS=4 BUSI=.device/busi OUT=/tmp/out bash bench/gpu_busi_cv.sh
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 M2SNET_OFFLINE=1 HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"
python3 bench/busi_cv.py --busi "${BUSI:-.device/busi}" --work /tmp/work --size 352 --epochs "${EPOCHS:-4}" \
  --batch 16 --pretrained false --no-validate --workers 8 --models "${MODELS:-m2snet,msnet,unet}" \
  --out /tmp/cvout 2>&1 | tr "\r" "\n" | grep -v -E "it/s|s/it|^\s*$" | tee "${OUT:-/tmp}/busi_cv_352.log"
cp /tmp/cvout/busi_cv_table.md /tmp/cvout/busi_cv.json "${OUT:-/tmp}/" 2>/dev/null || true
