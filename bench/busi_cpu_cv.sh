#!/usr/bin/env bash
# The full-data BUSI cross-validation on a CPU box with the product itself (issue 30): `m2snet cv --preset busi-cpu`
# (all 585 training cases of each fold, the paper's recipe at 128 px, final epoch, duplicate clusters kept in one
# fold), M2SNet on all 4 folds, then MSNet on folds 0 and 1 at the same budget, then `m2snet compare`.
# Two worker processes of one torch thread each (the fastest use of 2 cores for batch 8: no thread barriers), each
# taking folds in turn; every fold resumes from its last.pt, so the script can be stopped (Ctrl-C, a lost session)
# and run again to continue where it stopped, with results identical to an uninterrupted run.
# Usage (repo root): BUSI=../shared/data/busi OUT=/work/busi-cv bash bench/busi_cpu_cv.sh
set -uo pipefail
M2SNET=${M2SNET:-$PWD/.venv/bin/m2snet}
OUT=${OUT:-/tmp/busi-cv}
MSNET_FOLDS=${MSNET_FOLDS:-0,1}
export OMP_NUM_THREADS=1 M2SNET_OFFLINE=${M2SNET_OFFLINE:-1} PYTHONUNBUFFERED=1
mkdir -p "$OUT/logs" && cd "$OUT" || exit 1
[ -f busi/dataset.json ] || "$M2SNET" data import -f busi "${BUSI:-../shared/data/busi}" busi > logs/import.log 2>&1 \
  || { tail -n 5 logs/import.log; exit 1; }
SPLIT=$OUT/busi.split-4fold-seed42.json
[ -f "$SPLIT" ] || "$M2SNET" data split busi --seed 42 --out "$SPLIT" || exit 1
trap 'kill 0' INT TERM
cv() {  # model, folds, log name: one worker
  "$M2SNET" cv --preset busi-cpu --model "$1" --data busi --split "$SPLIT" --folds "$2" --out "runs/$1" --resume \
    --device cpu --no-track --no-log-model > "logs/$3.log" 2>&1
  local rc=$?
  echo "$(date +%T) $3 (folds $2) rc=$rc"
}
echo "$(date +%T) start: M2SNet folds 0,2 | 1,3, then MSNet folds $MSNET_FOLDS"
cv m2snet 0,2 m2snet-w0 & cv m2snet 1,3 m2snet-w1 & wait
IFS=, read -r fa fb <<< "$MSNET_FOLDS"
cv msnet "$fa" msnet-w0 & cv msnet "$fb" msnet-w1 & wait
# The workers' tables already cover all folds (each writes the report of every finished fold in its --out);
# this pass records the CV in MLflow on SQLite, one parent run with every fold as its child (the workers
# run untracked). Every fold is complete: --resume only re-scores.
for model in m2snet msnet; do
  folds=$([ $model = m2snet ] && echo 0,1,2,3 || echo "$MSNET_FOLDS")
  "$M2SNET" cv --preset busi-cpu --model $model --data busi --split "$SPLIT" --folds "$folds" --out "runs/$model" \
    --resume --device cpu --tracking-uri "sqlite:///$OUT/mlflow.db" --experiment busi-cpu-cv > "logs/$model-table.log" 2>&1
  rc=$?
  echo "$(date +%T) $model table rc=$rc"; tail -n 8 "logs/$model-table.log"
done
"$M2SNET" compare runs/msnet runs/m2snet --out compare --no-track | tee logs/compare.log
