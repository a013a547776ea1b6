#!/usr/bin/env bash
# The BUSI cross-validation checks, for a lent CUDA machine that has torch/timm/torchmetrics but not the
# rest of the stack: installs the extra wheels carried in .whl/ (segmentation-models-pytorch, ImageHash,
# PyWavelets), imports BUSI once (near-duplicate clusters included), then runs three CV jobs side by
# side on the one GPU (each is launch-bound at batch 16, so they share it well):
#   old protocol (sha256 groups, best epoch on the fold) : m2snet (shared BN), msnet
#   new protocol (clusters, final epoch)                 : m2snet shared vs per-site (+ batch-stats, recalibrated)
#   new protocol                                         : msnet, unet
# Usage (repo root): EPOCHS=4 BUSI=.device/busi OUT=/tmp/out bash bench/gpu_busi_cv.sh
# CPU dry run of the logic: PYTHON=.venv/bin/python NO_WHEELS=1 SIZE=64 EPOCHS=1 \
#   EXTRA="--cases-per-fold 8 --val-cases 8 --workers 0" OUT=/tmp/out bash bench/gpu_busi_cv.sh
set -uo pipefail
PY=${PYTHON:-python3}
if [ -z "${NO_WHEELS:-}" ]; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
fi
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 M2SNET_OFFLINE=1 HF_HUB_OFFLINE=1
OUT=${OUT:-/tmp}
RES=/tmp/res  # everything comes back as one archive ($OUT/busi_cv.tar.gz): the device returns few files
mkdir -p $RES
WORK=/tmp/work
LIMIT=${LIMIT:-400}  # seconds for the three CV jobs together; a job cut short still printed its finished rows
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null
"$PY" -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"
COMMON=(--busi "${BUSI:-.device/busi}" --work $WORK --size "${SIZE:-352}" --epochs "${EPOCHS:-4}" --batch 16
        --pretrained false --no-validate --workers 4 ${EXTRA:-})
# Import + both splits + the 352 px cache once, before the jobs share them.
"$PY" - "${BUSI:-.device/busi}" $WORK "${SIZE:-352}" <<'EOF' 2>&1 | grep -v "it/s" | tee "$RES/import.log"
import sys, time
from pathlib import Path
sys.path.insert(0, "bench")
from busi_cv import import_busi
from m2snet.data.cache import build_cache
t0 = time.perf_counter()
info, splits = import_busi(Path(sys.argv[1]), Path(sys.argv[2]), 42, validate=False)
build_cache(info, int(sys.argv[3]), Path(sys.argv[2]) / "cache", progress=False)
print(f"import + splits + cache: {time.perf_counter() - t0:.0f}s")
EOF
[ -n "${IMPORT_ONLY:-}" ] && exit 0  # e.g. while another GPU bench runs
run() {  # name, args...
  local name=$1; shift
  timeout -k 5 "$LIMIT" "$PY" bench/busi_cv.py "${COMMON[@]}" --out "/tmp/cv-$name" "$@" 2>&1 | tr "\r" "\n" \
    | grep -v -E "it/s|s/it|^\s*$" > "$RES/cv_$name.log"
  cp "/tmp/cv-$name/busi_cv_table.md" "$RES/table_$name.md" 2>/dev/null
  cp "/tmp/cv-$name/busi_cv.json" "$RES/cv_$name.json" 2>/dev/null
  cp "/tmp/cv-$name/val_dice_curves.png" "$RES/curves_$name.png" 2>/dev/null
  # one fold's learning curves per model (the per-epoch validation Dice, as the run's artifact)
  for d in /tmp/cv-"$name"/*/; do cp "$d/cv_learning_curves.png" "$RES/lc_${name}_$(basename "$d").png" 2>/dev/null; done
}
run old --protocol old --models "m2snet-shared=m2snet:msu_norm=shared,msnet" &
run m2snet --protocol new --extra-evals batch-stats,recalibrated \
  --models "m2snet-shared=m2snet:msu_norm=shared,m2snet-per-site=m2snet:msu_norm=per_site" &
run base --protocol new --models "msnet,unet" &
wait
grep -h "^\[" "$RES"/cv_*.log
tail -n 12 "$RES"/table_*.md
tar -C $RES -czf "$OUT/busi_cv.tar.gz" .
