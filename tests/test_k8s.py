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
    assert "--backend-store-uri=postgresql://" in args
    assert "--artifacts-destination=s3://" in args
    env = {e["name"] for e in container["env"]}
    assert {"MLFLOW_AUTH_CONFIG_PATH", "MLFLOW_S3_ENDPOINT_URL", "AWS_ACCESS_KEY_ID"} <= env
    # Every container sets resource limits (the GPU overlay's quota makes limits matter).
    for o in objs:
        pod = o.get("spec", {}).get("template", {}).get("spec")
        for c in (pod or {}).get("containers", []):
            assert c.get("resources", {}).get("limits"), f"{o['kind']}/{o['metadata']['name']}: no limits"
