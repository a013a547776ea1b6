#!/usr/bin/env bash
# Build and tag the m2snet component image (docker/Dockerfile) with docker or podman.
#
#   docker/build.sh                       # ghcr.io/m2snet/m2snet:<version>, CUDA torch from PyPI
#   docker/build.sh tracking              # ghcr.io/m2snet/m2snet-tracking:<version>, the MLflow server's image
#   TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu TORCH="torch==2.14.1+cpu torchvision==0.29.1+cpu" \
#     TAG=ghcr.io/m2snet/m2snet:0.1.0-cpu docker/build.sh   # CPU-only torch (untested here: no such index)
#
# Environment (all optional):
#   ENGINE      docker | podman (default: docker when its daemon answers, else podman)
#   TAG         image tag (default: m2snet.kubeflow.image.COMPONENT_IMAGE, ghcr.io/m2snet/m2snet:<version>)
#   BASE_IMAGE  base image (default: python:3.11-slim; where it can be neither found nor pulled, a
#               Debian bookworm base is made with debootstrap and imported as $LOCAL_BASE, once)
#   TORCH, TORCH_INDEX_URL   passed to the Dockerfile (e.g. a CPU-only torch); a TORCH_INDEX_URL holding
#               credentials is refused (exit 2): build arguments stay in the image's history
#   PYTHON      the interpreter whose pip settings are forwarded (default: python3)
#
# With podman the builder's pip settings (pip config + PIP_* variables: index, find-links, constraint,
# certificate) are forwarded, and the local directories and files they name are mounted read-only into
# the build, so a machine with a local wheel mirror does not download torch again. With docker only
# URL-valued settings are forwarded (docker build cannot mount host directories).
set -euo pipefail
cd "$(dirname "$0")/.."

PUBLIC_BASE=docker.io/library/python:3.11-slim
LOCAL_BASE=${LOCAL_BASE:-localhost/m2snet-base:bookworm}
PYTHON=${PYTHON:-python3}
VERSION=$(sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
# Which image: the component image (docker/Dockerfile) or, with `tracking`, the tracking server's.
case ${1:-component} in
  component) DOCKERFILE=docker/Dockerfile; TAG=${TAG:-ghcr.io/m2snet/m2snet:$VERSION} ;;
  tracking) DOCKERFILE=docker/tracking.Dockerfile; TAG=${TAG:-ghcr.io/m2snet/m2snet-tracking:$VERSION} ;;
  *) echo "build.sh: unknown image '$1' (component or tracking)" >&2; exit 2 ;;
esac

if [[ -z "${ENGINE:-}" ]]; then
  if command -v docker >/dev/null && docker info >/dev/null 2>&1; then ENGINE=docker
  elif command -v podman >/dev/null; then ENGINE=podman
  else echo "build.sh: neither a docker daemon nor podman found (apt-get install podman runc)" >&2; exit 2
  fi
fi
if [[ $ENGINE == podman && -z "${CONTAINERS_CONF:-}" ]] && command -v runc >/dev/null; then
  # runc and lowered ulimits: what works in unprivileged sandboxes (see docker/containers.conf).
  export CONTAINERS_CONF=$PWD/docker/containers.conf
fi

have_image() { "$ENGINE" image inspect "$1" >/dev/null 2>&1; }

make_local_base() {
  # A Debian bookworm root file system with Python 3.11 and venv, from Debian's own packages.
  command -v debootstrap >/dev/null || { echo "build.sh: no registry and no debootstrap (apt-get install debootstrap)" >&2; exit 2; }
  local rootfs
  rootfs=$(mktemp -d /var/tmp/m2snet-rootfs.XXXXXX)
  trap 'rm -rf "$rootfs"' RETURN
  echo "build.sh: making $LOCAL_BASE with debootstrap (a few minutes)"
  debootstrap --variant=minbase --include=python3,python3-venv bookworm "$rootfs" >"$rootfs.log" 2>&1 \
    || { tail -n 20 "$rootfs.log" >&2; exit 2; }
  rm -f "$rootfs.log"
  rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
  tar -C "$rootfs" -c . | "$ENGINE" import --change 'CMD ["/bin/bash"]' - "$LOCAL_BASE" >/dev/null
}

if [[ -z "${BASE_IMAGE:-}" ]]; then
  if have_image "$PUBLIC_BASE" || timeout 60 "$ENGINE" pull -q "$PUBLIC_BASE" >/dev/null 2>&1; then
    BASE_IMAGE=$PUBLIC_BASE
  else
    have_image "$LOCAL_BASE" || make_local_base
    BASE_IMAGE=$LOCAL_BASE
  fi
fi

# Build arguments are recorded in the image's history: a URL holding a password or token (user:pass@,
# TOKEN@, ?token=/?password=/...key=) is never forwarded as one.
holds_credentials() {
  local lower=${1,,}
  [[ $1 =~ ://[^/?#[:space:]]*@ || $lower =~ [?\&\;][^=]*(secret|passw|pwd|token|credential|key|auth|sig)[^=]*= ]]
}

args=(--network host --build-arg "BASE_IMAGE=$BASE_IMAGE")
[[ -n "${TORCH:-}" ]] && args+=(--build-arg "TORCH=$TORCH")
if [[ -n "${TORCH_INDEX_URL:-}" ]]; then
  # Refused rather than dropped: without it the build would quietly install a different torch.
  if holds_credentials "$TORCH_INDEX_URL"; then
    echo "build.sh: TORCH_INDEX_URL holds credentials, which the image's history would keep; give the index" \
         "without them (pass credentials with a pip.conf secret)" >&2
    exit 2
  fi
  args+=(--build-arg "TORCH_INDEX_URL=$TORCH_INDEX_URL")
fi

# The builder's effective pip settings: its config files, then PIP_* variables (which win, as in pip).
declare -A pip=()
while IFS= read -r line; do
  key=${line%%=*}; value=${line#*=}; value=${value#\'}; value=${value%\'}
  key=${key#*.}; pip[${key}]=$value
done < <("$PYTHON" -m pip config list 2>/dev/null | grep -v '^:env:' || true)
for key in index-url extra-index-url find-links constraint cert default-timeout; do
  var=PIP_$(tr 'a-z-' 'A-Z_' <<<"$key")
  if [[ -n "${!var:-}" ]]; then pip[$key]=${!var}; fi
done
declare -A mounts=()
for key in "${!pip[@]}"; do
  value=${pip[$key]}
  case $key in index-url|extra-index-url|find-links|constraint|cert|default-timeout) ;; *) continue ;; esac
  local_value=0
  for item in $value; do
    path=${item#file://}
    if [[ $path == /* ]]; then
      local_value=1
      # Mount the directory holding a file (a constraint file may name others beside it).
      if [[ -f $path ]]; then path=$(dirname "$path"); fi
      # An index's simple/ pages link to files/ beside it: mount their parent.
      if [[ $path == */simple || $path == */simple/ ]]; then path=$(dirname "$path"); fi
      if [[ -e $path ]]; then mounts[$path]=1; fi
    fi
  done
  if [[ $local_value == 1 && $ENGINE != podman ]]; then continue; fi
  if holds_credentials "$value"; then
    echo "build.sh: not forwarding pip's $key (it holds credentials); pass them with a pip.conf secret" >&2
    continue
  fi
  args+=(--build-arg "PIP_$(tr 'a-z-' 'A-Z_' <<<"$key")=$value")
done
for path in "${!mounts[@]}"; do args+=(--volume "$path:$path:ro"); done

echo "build.sh: $ENGINE build $TAG from $BASE_IMAGE"
start=$(date +%s)
"$ENGINE" build "${args[@]}" -f "$DOCKERFILE" -t "$TAG" .
echo "build.sh: built $TAG in $(( $(date +%s) - start )) s; size $("$ENGINE" image inspect --format '{{.Size}}' "$TAG" | awk '{printf "%.2f GB", $1/1e9}')"
