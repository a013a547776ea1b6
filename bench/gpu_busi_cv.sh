#!/usr/bin/env bash
# The BUSI cross-validation checks, for a lent CUDA machine that has torch/timm/torchmetrics but not the
# rest of the stack: installs the extra wheels carried in .whl/ (segmentation-models-pytorch, ImageHash,
# PyWavelets), imports BUSI once (near-duplicate clusters included), then runs three CV jobs side by
# side on the one GPU (each is launch-bound at batch 16, so they share it well):
#   old protocol (sha256 groups, best epoch on the fold) : m2snet (shared BN), msnet
#   new protocol (clusters, final epoch)                 : m2snet shared vs per-site (+ batch-stats, recalibrated)
#   new protocol                                         : msnet, unet
# Usage (repo root): EPOCHS=4 BUSI=.device/busi OUT=/tmp/out bash bench/gpu_busi_cv.sh
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 M2SNET_OFFLINE=1 HF_HUB_OFFLINE=1
OUT=${OUT:-/tmp}
WORK=/tmp/work
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"
COMMON=(--busi "${BUSI:-.device/busi}" --work $WORK --size "${SIZE:-352}" --epochs "${EPOCHS:-4}" --batch 16
        --pretrained false --no-validate --workers 4)
# Import + both splits + the 352 px cache once, before the jobs share them.
python3 - "${BUSI:-.device/busi}" $WORK "${SIZE:-352}" <<'EOF' 2>&1 | tee "$OUT/import.log"
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
run() {  # name, args...
  local name=$1; shift
  python3 bench/busi_cv.py "${COMMON[@]}" --out "/tmp/cv-$name" "$@" 2>&1 | tr "\r" "\n" \
    | grep -v -E "it/s|s/it|^\s*$" > "$OUT/cv_$name.log"
  cp "/tmp/cv-$name/busi_cv_table.md" "$OUT/table_$name.md" 2>/dev/null
  cp "/tmp/cv-$name/val_dice_curves.png" "$OUT/curves_$name.png" 2>/dev/null
}
run old --protocol old --models "m2snet-shared=m2snet:msu_norm=shared,msnet" &
run m2snet --protocol new --extra-evals batch-stats,recalibrated \
  --models "m2snet-shared=m2snet:msu_norm=shared,m2snet-per-site=m2snet:msu_norm=per_site" &
run base --protocol new --models "msnet,unet" &
wait
tail -n 12 "$OUT"/table_*.md
