"""Render a kustomization of k8s/ and apply it, refusing Secrets that still hold a CHANGE-ME placeholder.

Usage: python tools/k8s_apply.py [--dry-run] [KUSTOMIZATION]      (default: k8s/overlays/gpu; `make deploy`)

`kubectl apply -k` would deploy the templates of k8s/base/secrets.yaml as they are: a PostgreSQL,
S3 and MLflow admin password anyone can read in this repository. This renders with `kubectl
kustomize`, checks every Secret (stringData, and data after base64 decoding), and only then pipes
the rendered manifests to `kubectl apply -f -`. With --dry-run it prints them instead (no cluster
needed). Exit status 2 names each Secret and key still holding a placeholder; nothing is applied.
$KUBECTL picks the kubectl binary (default: kubectl on PATH).
"""
from __future__ import annotations

import argparse
import base64
import binascii
import os
import subprocess
import sys
from pathlib import Path

import yaml

PLACEHOLDER = "CHANGE-ME"
DEFAULT_KUSTOMIZATION = Path(__file__).resolve().parents[1] / "k8s" / "overlays" / "gpu"


def secret_values(secret: dict) -> dict[str, str]:
    """A Secret's values by key, as the pod will see them (``data`` is base64)."""
    values = {k: str(v) for k, v in (secret.get("stringData") or {}).items()}
    for key, encoded in (secret.get("data") or {}).items():
        try:
            values[key] = base64.b64decode(str(encoded), validate=True).decode("utf-8", errors="replace")
        except (binascii.Error, ValueError):
            values[key] = str(encoded)
    return values


def placeholders(manifests: str) -> list[str]:
    """``Secret NAMESPACE/NAME key KEY`` for every Secret value that still holds the placeholder."""
    found = []
    for obj in yaml.safe_load_all(manifests):
        if not obj or obj.get("kind") != "Secret":
            continue
        meta = obj.get("metadata", {})
        name = f"{meta['namespace']}/{meta['name']}" if meta.get("namespace") else meta.get("name", "?")
        found += [f"Secret {name} key {key}" for key, value in secret_values(obj).items() if PLACEHOLDER in value]
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("kustomization", nargs="?", type=Path, default=DEFAULT_KUSTOMIZATION)
    parser.add_argument("--dry-run", action="store_true", help="print the checked manifests, apply nothing")
    args = parser.parse_args(argv)
    kubectl = os.environ.get("KUBECTL", "kubectl")
    try:
        rendered = subprocess.run([kubectl, "kustomize", str(args.kustomization)], capture_output=True, text=True)
    except FileNotFoundError:
        print(f"k8s_apply: {kubectl} not found (install kubectl or set KUBECTL)", file=sys.stderr)
        return 2
    if rendered.returncode != 0:
        print(f"k8s_apply: {args.kustomization}: kubectl kustomize failed: {rendered.stderr.strip()}", file=sys.stderr)
        return 2
    unfilled = placeholders(rendered.stdout)
    if unfilled:
        for where in unfilled:
            print(f"k8s_apply: {args.kustomization}: {where} still holds a {PLACEHOLDER} placeholder", file=sys.stderr)
        print("k8s_apply: nothing applied; fill in k8s/base/secrets.yaml (or create these Secrets with your "
              "secret manager and drop secrets.yaml from the kustomization)", file=sys.stderr)
        return 2
    if args.dry_run:
        sys.stdout.write(rendered.stdout)
        return 0
    return subprocess.run([kubectl, "apply", "-f", "-"], input=rendered.stdout, text=True).returncode


if __name__ == "__main__":
    sys.exit(main())
