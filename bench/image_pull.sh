#!/usr/bin/env bash
# Image size and pull time, component image vs the tracking server's (issue 27, item 4): a registry on
# loopback (Debian's docker-registry), each image pushed to it, then pulled into an EMPTY podman storage, so
# every layer is transferred, decompressed and written, as on a node that never had it. Prints per image the
# size on disk, the bytes a pull transfers (compressed blobs in the registry) and the pull time, then ratios.
# Loopback has no network cost: on a real node add transfer = compressed bytes / bandwidth (printed at 1 Gbit/s).
# Usage (repo root, images built with docker/build.sh [tracking]):
#   bash bench/image_pull.sh [IMAGE ...]   (default: the component and tracking images of this version)
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION=$(sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
IMAGES=("$@")
[ ${#IMAGES[@]} -gt 0 ] || IMAGES=("ghcr.io/m2snet/m2snet:$VERSION" "ghcr.io/m2snet/m2snet-tracking:$VERSION")
export CONTAINERS_CONF=${CONTAINERS_CONF:-$PWD/docker/containers.conf}
command -v docker-registry >/dev/null || { echo "image_pull.sh: apt-get install docker-registry" >&2; exit 2; }
WORK=$(mktemp -d /var/tmp/m2snet-pull.XXXXXX)
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
REGISTRY=127.0.0.1:$PORT
cleanup() {
  [ -n "${REG_PID:-}" ] && kill "$REG_PID" 2>/dev/null && wait "$REG_PID" 2>/dev/null || true
  podman --root "$WORK/root" --runroot "$WORK/run" rmi -a -f >/dev/null 2>&1 || true
  rm -rf "$WORK"
  for image in "${IMAGES[@]}"; do podman rmi "$REGISTRY/${image#*/}" >/dev/null 2>&1 || true; done
}
trap cleanup EXIT
cat > "$WORK/registry.yml" <<YAML
version: 0.1
storage: {filesystem: {rootdirectory: $WORK/registry}}
http: {addr: $REGISTRY}
log: {level: error}
YAML
docker-registry serve "$WORK/registry.yml" > "$WORK/registry.log" 2>&1 &
REG_PID=$!
for _ in $(seq 50); do curl -sf "http://$REGISTRY/v2/" >/dev/null && break; sleep 0.2; done

printf '%-42s %10s %12s %10s %14s\n' image "on disk" "transferred" "pull (s)" "+ 1 Gbit/s (s)"
declare -A disk=() sent=() pull=()
for image in "${IMAGES[@]}"; do
  remote=$REGISTRY/${image#*/}
  podman tag "$image" "$remote"
  podman push -q --tls-verify=false --compression-format gzip "$remote" >/dev/null
  start=$(date +%s.%N)
  podman --root "$WORK/root" --runroot "$WORK/run" pull -q --tls-verify=false "$remote" >/dev/null
  pull[$image]=$(echo "$(date +%s.%N) - $start" | bc)
  disk[$image]=$(podman image inspect --format '{{.Size}}' "$image")
  # What a pull transfers: the compressed blobs its manifest lists (a layer shared with another image counts
  # for each: on a node with the other image it would not be transferred again).
  path=${image#*/}
  sent[$image]=$(curl -sf -H 'Accept: application/vnd.oci.image.manifest.v1+json' \
      -H 'Accept: application/vnd.docker.distribution.manifest.v2+json' \
      "http://$REGISTRY/v2/${path%:*}/manifests/${path##*:}" \
    | python3 -c 'import json, sys; m = json.load(sys.stdin); print(sum(x["size"] for x in [m["config"], *m["layers"]]))')
  printf '%-42s %8.2f GB %9.2f GB %10.1f %14.1f\n' "$image" "$(echo "${disk[$image]} / 1000000000" | bc -l)" \
    "$(echo "${sent[$image]} / 1000000000" | bc -l)" "${pull[$image]}" "$(echo "${pull[$image]} + ${sent[$image]} * 8 / 1000000000" | bc -l)"
  podman --root "$WORK/root" --runroot "$WORK/run" rmi -a -f >/dev/null 2>&1 || true
done
if [ ${#IMAGES[@]} -ge 2 ]; then
  a=${IMAGES[0]}; b=${IMAGES[1]}
  printf 'ratios %s / %s: on disk %.1fx, transferred %.1fx, pull %.1fx\n' "${a##*/}" "${b##*/}" \
    "$(echo "${disk[$a]} / ${disk[$b]}" | bc -l)" "$(echo "${sent[$a]} / ${sent[$b]}" | bc -l)" \
    "$(echo "${pull[$a]} / ${pull[$b]}" | bc -l)"
fi
