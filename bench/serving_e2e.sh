#!/usr/bin/env bash
# Issue 27's local end-to-end run, every step a user's command: services up -> pipeline (v1) -> promote ->
# the serving container (the image, run as k8s/overlays/serving/serving.yaml runs it) -> requests -> a second
# pipeline run (v2) -> promote v2 -> restart (the rollout restart) -> the answers change -> rollback -> v1.
# Needs the component image (docker/build.sh) and podman (or docker). Prints each command, then what it answered.
#
# DATA: a raw BUSI folder (default ../shared/data/busi when present): both versions train on it at the tiny
# preset's budget (1 epoch, 64 px) -- few skills, but ~195 held-out cases a fold, enough for the registration
# to fit the input guard, so the answers carry ood_score / ood_flag. Without it the demo set is used, whose
# folds are too small for a guard (the answers then have no ood columns). OOD: an image from another domain
# (default: the first Kvasir-SEG frame in ../shared/data/kvasir-seg when present).
# Usage (repo root): OUT=/tmp/serving-e2e bash bench/serving_e2e.sh
set -euo pipefail
M2SNET=${M2SNET:-$PWD/.venv/bin/m2snet}
ENGINE=${ENGINE:-podman}
IMAGE=${IMAGE:-$(.venv/bin/python -c 'from m2snet.kubeflow.image import COMPONENT_IMAGE; print(COMPONENT_IMAGE)')}
OUT=${OUT:-/tmp/serving-e2e}
MODEL=${MODEL:-m2snet-busi}
PORT=${PORT:-8080}
PICTURE=${PICTURE:-}
DATA=${DATA:-$( [ -d ../shared/data/busi ] && cd ../shared/data/busi && pwd )}
# (find -print -quit, not `ls | head`: under pipefail a SIGPIPEd ls ends the script)
OOD=${OOD:-$(find ../shared/data/kvasir-seg/images -maxdepth 1 -type f -print -quit 2>/dev/null || true)}
export CONTAINERS_CONF=${CONTAINERS_CONF:-$PWD/docker/containers.conf} M2SNET_OFFLINE=1
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
say() { printf '\n$ %s\n' "$*"; }
cleanup() {
  "$ENGINE" rm -f m2snet-serve-e2e >/dev/null 2>&1 || true
  # TERM, not INT: a background job of a non-interactive shell starts with SIGINT ignored, so an INT left the
  # services running and this script waiting on them (its first full run did).
  [ -n "${SERVICES_PID:-}" ] && kill -TERM "$SERVICES_PID" 2>/dev/null && wait "$SERVICES_PID" 2>/dev/null || true
}
trap cleanup EXIT

say "m2snet services up --dir $OUT/services &"
"$M2SNET" services up --dir "$OUT/services" > "$OUT/services.log" 2>&1 &
SERVICES_PID=$!
for _ in $(seq 120); do grep -q "^export MLFLOW_TRACKING_URI" "$OUT/services.log" && break; sleep 1; done
eval "$(grep '^export ' "$OUT/services.log")"
grep '^export ' "$OUT/services.log" | sed 's/\(KEY_ID=\|SECRET[A-Z_]*=\).*/\1***/'

run_pipeline() {  # work dir, split seed
  local data=()
  [ -n "$DATA" ] && data=(--preset tiny --data "$DATA" --importer busi) || data=(--preset demo)
  say "m2snet pipeline run --local ${data[*]} --seed $2 --model-name $MODEL --work-dir $OUT/$1"
  "$M2SNET" pipeline run --local "${data[@]}" --seed "$2" --model-name "$MODEL" --work-dir "$OUT/$1" \
    > "$OUT/$1.log" 2>&1 || { tail -n 20 "$OUT/$1.log"; exit 1; }
  grep -E "registered|promot|guard|CV Dice|cv_dice" "$OUT/$1.log" | tail -n 5
}
ask() {  # one request with a picture; prints the columns the server answered with, but the mask
  local body
  body=$(printf '{"dataframe_split": {"columns": ["image"], "data": [["%s"]]}}' "$(base64 -w0 "$PICTURE")")
  say "curl -s -X POST http://127.0.0.1:$PORT/invocations -H 'Content-Type: application/json' -d @request.json"
  curl -s -X POST "http://127.0.0.1:$PORT/invocations" -H 'Content-Type: application/json' -d "$body" \
    | .venv/bin/python -c 'import json, sys; p = json.load(sys.stdin)["predictions"][0]; p.pop("mask"); print(p)'
}
wait_ready() {
  for _ in $(seq 300); do curl -sf "http://127.0.0.1:$PORT/ping" >/dev/null && return 0; sleep 1; done
  "$ENGINE" logs m2snet-serve-e2e | tail -n 20; exit 1
}

run_pipeline run1 1
if [ -z "$PICTURE" ]; then
  PICTURE=$(find "${DATA:-$OUT/run1}" -path '*benign*' -name '*.png' ! -name '*mask*' -print -quit)
fi
say "m2snet promote $MODEL 1"
"$M2SNET" promote "$MODEL" 1 || true  # the pipeline's own promote step may have moved it already

say "$ENGINE run -d --name m2snet-serve-e2e --network host --memory 3g -e MLFLOW_TRACKING_URI=... $IMAGE m2snet serve --model=models:/$MODEL@production --port=$PORT"
serve() {  # a new container each time, as a rollout restart makes a new pod
  "$ENGINE" rm -f m2snet-serve-e2e >/dev/null 2>&1 || true
  "$ENGINE" run -d --name m2snet-serve-e2e --network host --memory 3g --tmpfs /cache:rw,mode=1777 \
  -e MLFLOW_TRACKING_URI="$MLFLOW_TRACKING_URI" -e M2SNET_DEVICE=cpu -e M2SNET_CACHE_DIR=/cache -e HOME=/tmp \
  -e M2SNET_MAX_REQUEST_PIXELS=100000000 -e M2SNET_MAX_CONCURRENT_PREDICTIONS=1 \
  "$IMAGE" m2snet serve "--model=models:/$MODEL@production" --host=0.0.0.0 "--port=$PORT" --workers=1 >/dev/null
}
ask_all() {  # the in-distribution picture, then what the guard should flag
  echo "# $PICTURE"; ask
  local saved=$PICTURE
  if [ -n "$OOD" ]; then PICTURE=$OOD; echo "# another domain: $OOD"; ask; fi
  PICTURE=$OUT/noise.png; echo "# uniform noise"; ask
  PICTURE=$saved
}
.venv/bin/python -c "import numpy as np; from PIL import Image; Image.fromarray(np.random.default_rng(0).integers(0, 256, (128, 128, 3), dtype=np.uint8)).save('$OUT/noise.png')"
serve; wait_ready; ask_all

run_pipeline run2 2
say "m2snet promote $MODEL 2 --force"
"$M2SNET" promote "$MODEL" 2 --force
say "curl (the running server, before the restart: it resolved the alias at start)"
ask
say "$ENGINE rm -f m2snet-serve-e2e; $ENGINE run ... (the same)   # kubectl rollout restart deployment/m2snet-serve"
serve; wait_ready; ask_all
say "m2snet rollback $MODEL"
"$M2SNET" rollback "$MODEL"
say "$ENGINE rm -f m2snet-serve-e2e; $ENGINE run ... (the same)"
serve; wait_ready; ask
say "the registry's description of version 1 (the input guard's measured rates)"
.venv/bin/python -c "from mlflow import MlflowClient; print(MlflowClient().get_model_version('$MODEL', '1').description)"
