#!/usr/bin/env bash
# The M2SNet-vs-MSNet study of issue 21 on the CPU box, with the tool itself: one `m2snet cv` job per
# (model, recipe, seed), run by $WORKERS worker processes of one torch thread each, pulling from the
# queue below in order (so a cut-short study has finished the first jobs). A fold takes 8-12 min on a
# worker of the 2-core box shared with other work (~25-60 s a training epoch, ~50 s a validation pass),
# so only the first pair runs all 4 folds; the second seed, the paper's recipe, the ablations and U-Net
# run on folds 0-1 and the ablations on fold 0 (compare pairs the cases both sides scored). Then `m2snet compare`
# pairs any two of them on the same cases (bench/busi_study_report.sh).
# Budget (the same for every job): BUSI at 128 px, batch 8, 10 epochs, 128 training cases sampled per
# fold (seeded, the same cases for every job and seed), every validation case of the fold scored at
# its original size, final epoch, random initialisation, no LossNet (its VGG needs ImageNet weights).
# Usage (repo root): BUSI=../shared/data/busi STUDY=/tmp/study WORKERS=2 bash bench/busi_study.sh
set -uo pipefail
M2SNET=${M2SNET:-$PWD/.venv/bin/m2snet}
STUDY=${STUDY:-/tmp/study}
WORKERS=${WORKERS:-2}
export OMP_NUM_THREADS=1 M2SNET_OFFLINE=1 PYTHONUNBUFFERED=1
mkdir -p "$STUDY/runs" "$STUDY/logs"
cd "$STUDY"
if [ ! -f busi/dataset.json ]; then
  "$M2SNET" data import -f busi "${BUSI:-/work/shared/data/busi}" busi || exit 1
fi
SPLIT=$STUDY/busi.split-4fold-seed42.json
[ -f "$SPLIT" ] || "$M2SNET" data split busi --out "$SPLIT" || exit 1
# Build the 128 px cache once, before the workers share it.
[ -d "$STUDY/warm" ] || "$M2SNET" train --data busi --split "$SPLIT" --epochs 1 --size 128 --out "$STUDY/warm" --no-track \
  --set pretrained=false --set lossnet_weight=0 --set max_train_cases=1 --set max_val_cases=1 \
  --set device=cpu --set progress=false > logs/warm.log 2>&1 || { tail logs/warm.log; exit 1; }
# name | seed | folds | model and --set overrides
QUEUE=${QUEUE:-"m2snet-bb05|42|0,1,2,3|--model m2snet --set backbone_lr=0.05
msnet-bb05|42|0,1,2,3|--model msnet --set backbone_lr=0.05
m2snet-bb005|42|0,1|--model m2snet --set backbone_lr=0.005
msnet-bb005|42|0,1|--model msnet --set backbone_lr=0.005
m2snet-bb05|43|0,1|--model m2snet --set backbone_lr=0.05
msnet-bb05|43|0,1|--model msnet --set backbone_lr=0.05
unet-bb05|42|0,1|--model unet --set backbone_lr=0.05
m2snet-bb05-warmup02|42|0|--model m2snet --set backbone_lr=0.05 --set warmup_fraction=0.2
m2snet-bb05-bnmom001|42|0|--model m2snet --set backbone_lr=0.05 --set 'model_config={\"msu_bn_momentum\":0.01}'
m2snet-bb05-gamma01|42|0|--model m2snet --set backbone_lr=0.05 --set 'model_config={\"msu_gamma_init\":0.1}'"}
job() {
  IFS='|' read -r name seed folds args <<< "$1"
  out=runs/$name/seed$seed
  [ -f "$out/cv_per_case.csv" ] && { echo "done already: $out"; return 0; }
  echo "$(date +%T) start $name seed $seed folds $folds"
  # shellcheck disable=SC2086
  eval "\"$M2SNET\" cv --data busi --split \"$SPLIT\" --folds $folds --seeds $seed --out $out \
    --epochs 10 --size 128 --batch-size 8 --device cpu --no-track --no-log-model \
    --set pretrained=false --set lossnet_weight=0 --set lossnet_pretrained=false \
    --set max_train_cases=128 --set case_seed=42 --set head_lr=0.05 --set val_every=5 --set progress=false \
    $args" > "logs/$name-seed$seed.log" 2>&1
  rc=$?
  echo "$(date +%T) end $name seed $seed rc=$rc $(grep -E '^\| [a-z0-9]+: all cases' "logs/$name-seed$seed.log" | tail -1)"
}
export -f job; export M2SNET SPLIT
printf '%s\n' "$QUEUE" | xargs -d '\n' -P "$WORKERS" -I{} bash -c 'job "$@"' _ {}
