"""k8s/: every kustomization renders to objects that pass the Kubernetes schemas (offline)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

K8S = Path(__file__).resolve().parents[1] / "k8s"
KUBERNETES_VERSION = "1.30.0"
KUSTOMIZATIONS = [p.parent for p in sorted(K8S.rglob("kustomization.yaml"))]


def render(kdir: Path) -> list[dict]:
    """A small kustomize: the listed resources (recursively) with the namespace applied.

    Enough for our kustomizations, which only list resources and set a namespace (no patches,
    generators or name prefixes: the test below fails if one appears, so this stays honest).
    """
    spec = yaml.safe_load((kdir / "kustomization.yaml").read_text())
    unsupported = set(spec) - {"apiVersion", "kind", "namespace", "resources", "labels"}
    assert not unsupported, f"{kdir}: render() does not implement {unsupported}"
    objs: list[dict] = []
    for res in spec.get("resources", []):
        path = kdir / res
        if path.is_dir():
            objs += render(path)
        else:
            objs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    for obj in objs:
        for pairs in spec.get("labels", []):
            obj.setdefault("metadata", {}).setdefault("labels", {}).update(pairs["pairs"])
        cluster_scoped = obj["kind"] in {"Namespace", "PriorityClass", "ClusterRole", "ClusterRoleBinding"}
        if spec.get("namespace") and not cluster_scoped:
            obj["metadata"]["namespace"] = spec["namespace"]
    return objs


def _validate(objs: list[dict]) -> None:
    import kubernetes_validate

    for obj in objs:
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)


@pytest.mark.parametrize("kdir", KUSTOMIZATIONS, ids=lambda p: str(p.relative_to(K8S)))
def test_kustomization_validates(kdir):
    objs = render(kdir)
    _validate(objs)
    kinds = {o["kind"] for o in objs}
    assert {"Namespace", "StatefulSet", "Deployment", "Service", "Secret"} <= kinds
    names = [(o["kind"], o["metadata"]["name"]) for o in objs]
    assert len(names) == len(set(names)), "duplicate objects"
    # Every Secret is a template: placeholder values only, clearly marked.
    for secret in (o for o in objs if o["kind"] == "Secret"):
        values = " ".join(str(v) for v in secret.get("stringData", {}).values())
        assert "CHANGE-ME" in values, f"Secret {secret['metadata']['name']} holds no CHANGE-ME placeholder"
        assert "data" not in secret, "Secrets must be templates (stringData placeholders), not encoded values"


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl not installed (the pure-python render is tested)")
@pytest.mark.parametrize("kdir", KUSTOMIZATIONS, ids=lambda p: str(p.relative_to(K8S)))
def test_kubectl_kustomize_agrees(kdir):
    out = subprocess.run(["kubectl", "kustomize", str(kdir)], capture_output=True, text=True, check=True).stdout
    objs = [d for d in yaml.safe_load_all(out) if d]
    _validate(objs)
    ours = {(o["kind"], o["metadata"]["name"], o["metadata"].get("namespace")) for o in render(kdir)}
    theirs = {(o["kind"], o["metadata"]["name"], o["metadata"].get("namespace")) for o in objs}
    assert ours == theirs


def test_mlflow_server_is_authenticated_and_uses_postgres_and_s3():
    objs = render(K8S / "base")
    mlflow = next(o for o in objs if o["kind"] == "Deployment" and o["metadata"]["name"] == "mlflow")
    container = mlflow["spec"]["template"]["spec"]["containers"][0]
    args = " ".join(container["args"])
    assert "--app-name=basic-auth" in args
    assert any(e["name"] == "MLFLOW_BACKEND_STORE_URI" and e["value"].startswith("postgresql+psycopg2://")
               for e in container["env"])
    assert "--artifacts-destination=s3://" in args
    env = {e["name"] for e in container["env"]}
    assert {"MLFLOW_AUTH_CONFIG_PATH", "MLFLOW_S3_ENDPOINT_URL", "AWS_ACCESS_KEY_ID"} <= env
    # Every container sets resource limits (the GPU overlay's quota makes limits matter).
    for o in objs:
        pod = o.get("spec", {}).get("template", {}).get("spec")
        for c in (pod or {}).get("containers", []):
            assert c.get("resources", {}).get("limits"), f"{o['kind']}/{o['metadata']['name']}: no limits"


# --- tools/k8s_apply.py: what deploys k8s/ -------------------------------------------------------
ROOT = K8S.parent
APPLY = ROOT / "tools" / "k8s_apply.py"
needs_kubectl = pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl not installed (it renders k8s/)")


def _recording_kubectl(tmp_path: Path) -> tuple[Path, Path]:
    """A kubectl that renders with the real one and records, instead of running, anything else (no cluster here)."""
    calls = tmp_path / "kubectl-calls.txt"
    fake = tmp_path / "kubectl"
    fake.write_text(f'#!/usr/bin/env bash\nif [[ $1 == kustomize ]]; then exec {shutil.which("kubectl")} "$@"; fi\n'
                    f'echo "$*" >> {calls}\ncat > {tmp_path / "applied.yaml"}\n')
    fake.chmod(0o755)
    return fake, calls


def _apply(kdir: Path, kubectl: Path, *args: str) -> subprocess.CompletedProcess:
    import os
    import sys

    return subprocess.run([sys.executable, str(APPLY), *args, str(kdir)], capture_output=True, text=True,
                          env={**os.environ, "KUBECTL": str(kubectl)}, timeout=120)


@needs_kubectl
@pytest.mark.parametrize("dry_run", [True, False], ids=["dry-run", "apply"])
def test_apply_refuses_placeholder_secrets_before_deploying_anything(tmp_path, dry_run):
    kubectl, calls = _recording_kubectl(tmp_path)
    proc = _apply(K8S / "overlays" / "gpu", kubectl, *(["--dry-run"] if dry_run else []))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    # Each placeholder is named by its Secret and key, so the user knows what to fill in.
    for secret, key in [("postgres-credentials", "POSTGRES_PASSWORD"), ("s3-credentials", "AWS_SECRET_ACCESS_KEY"),
                        ("s3-credentials", "s3.json"), ("mlflow-auth", "basic_auth.ini"),
                        ("mlflow-client", "M2SNET_OPTUNA_STORAGE")]:
        assert f"Secret m2snet/{secret} key {key}" in proc.stderr
    assert "POSTGRES_USER" not in proc.stderr  # a filled-in key is not reported
    assert not calls.exists(), f"kubectl ran: {calls.read_text()}"
    assert proc.stdout == ""


@needs_kubectl
def test_apply_deploys_filled_in_secrets(tmp_path):
    k8s = tmp_path / "k8s"
    shutil.copytree(K8S, k8s)
    secrets = k8s / "base" / "secrets.yaml"
    secrets.write_text(secrets.read_text().replace("CHANGE-ME", "filled"))
    kubectl, calls = _recording_kubectl(tmp_path)
    dry = _apply(k8s / "overlays" / "gpu", kubectl, "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert not calls.exists()
    assert {(o["kind"], o["metadata"]["name"]) for o in yaml.safe_load_all(dry.stdout) if o} == {
        (o["kind"], o["metadata"]["name"]) for o in render(k8s / "overlays" / "gpu")}
    proc = _apply(k8s / "overlays" / "gpu", kubectl)
    assert proc.returncode == 0, proc.stderr
    assert calls.read_text().split() == ["apply", "-f", "-"]
    assert (tmp_path / "applied.yaml").read_text() == dry.stdout


def _containers(obj: dict) -> list[dict]:
    spec = obj.get("spec", {})
    pod = spec.get("template", {}).get("spec") or spec.get("jobTemplate", {}).get("spec", {}).get(
        "template", {}).get("spec") or (spec if obj["kind"] == "Pod" else {})
    return [*pod.get("initContainers", []), *pod.get("containers", [])]


@pytest.mark.parametrize("kdir", KUSTOMIZATIONS, ids=lambda p: str(p.relative_to(K8S)))
def test_every_container_is_locked_down(kdir):
    """No privilege escalation, no Linux capabilities; non-root wherever the image runs as a non-root user."""
    objs = render(kdir)
    checked = 0
    for obj in objs:
        pod = obj.get("spec", {}).get("template", {}).get("spec", {})
        for c in _containers(obj):
            where = f"{obj['kind']}/{obj['metadata']['name']} container {c['name']}"
            sc = c.get("securityContext", {})
            assert sc.get("allowPrivilegeEscalation") is False, f"{where}: allowPrivilegeEscalation is not false"
            assert sc.get("capabilities", {}).get("drop") == ["ALL"], f"{where}: capabilities not dropped"
            # Our image ends on USER 1000 (docker/Dockerfile); postgres' runs as its postgres user (999).
            if c["image"].startswith(("ghcr.io/m2snet/", "postgres:")):
                non_root = sc.get("runAsNonRoot", pod.get("securityContext", {}).get("runAsNonRoot"))
                assert non_root is True, f"{where}: runAsNonRoot is not set"
            checked += 1
    assert checked >= 4


def test_mlflow_database_password_is_not_on_the_command_line():
    """kubelet expands $(VAR) in args into the process's argv, which `ps` shows: the URI goes in an env var."""
    objs = render(K8S / "base")
    mlflow = next(o for o in objs if o["kind"] == "Deployment" and o["metadata"]["name"] == "mlflow")
    container = mlflow["spec"]["template"]["spec"]["containers"][0]
    argv = " ".join(container.get("command", []) + container.get("args", []))
    assert "PASSWORD" not in argv and "postgresql" not in argv
    env = container["env"]
    names = [e["name"] for e in env]
    uri = next(e for e in env if e["name"] == "MLFLOW_BACKEND_STORE_URI")
    assert uri["value"].startswith("postgresql+psycopg2://$(POSTGRES_USER):$(POSTGRES_PASSWORD)@postgres:5432/")
    # kubelet expands $(VAR) only from variables defined before it in the list.
    for var in ("POSTGRES_USER", "POSTGRES_PASSWORD", "POSTGRES_DB"):
        ref = next(e for e in env if e["name"] == var)
        assert ref["valueFrom"]["secretKeyRef"] == {"name": "postgres-credentials", "key": var}
        assert names.index(var) < names.index("MLFLOW_BACKEND_STORE_URI")


def test_the_serving_overlay_serves_the_production_alias_with_bounded_memory_and_secret_credentials():
    from m2snet.mlops.pyfunc import BATCH_PIXELS
    from m2snet.mlops.pyfunc_io import DEFAULT_MAX_REQUEST_PIXELS, MAX_REQUEST_PIXELS_ENV

    objs = render(K8S / "overlays" / "serving")
    by = {(o["kind"], o["metadata"]["name"]): o for o in objs}
    deployment = by[("Deployment", "m2snet-serve")]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert container["command"] == ["m2snet", "serve"]
    assert "--model=models:/m2snet-busi@production" in container["args"]
    env = {e["name"]: e for e in container["env"]}
    for var in ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        assert env[var]["valueFrom"]["secretKeyRef"]["name"] == "mlflow-client", var  # never a literal
    # The memory limit holds the request budget the server enforces (one request at a time).
    assert int(env[MAX_REQUEST_PIXELS_ENV]["value"]) == DEFAULT_MAX_REQUEST_PIXELS >= BATCH_PIXELS
    assert env["M2SNET_MAX_CONCURRENT_PREDICTIONS"]["value"] == "1"
    assert container["resources"]["limits"]["memory"] == "3Gi"
    assert container["readinessProbe"]["httpGet"]["path"] == "/ping"
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"
    hpa = by[("HorizontalPodAutoscaler", "m2snet-serve")]
    assert hpa["spec"]["scaleTargetRef"]["name"] == "m2snet-serve"
    service = by[("Service", "m2snet-serve")]
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
