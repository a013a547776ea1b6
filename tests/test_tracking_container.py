"""The MLflow tracking server from its own image, as the cluster's Deployment runs it (k8s/base/mlflow.yaml: its
command, arguments, environment with kubelet's $(VAR) expansion, the basic-auth file from the Secret's template),
against the machine's PostgreSQL and a SeaweedFS on loopback: it starts, refuses a client without credentials,
and keeps a run's parameters, metrics and artifacts (proxied to S3) for one with them.

Opt-in (marker ``container``, ``make test-container``): it needs podman (or a docker daemon) and builds the image.
"""

from __future__ import annotations

import re
import secrets
import subprocess
import time
from pathlib import Path

import pytest
import requests
import yaml

from m2snet.processes import free_port
from tests.fixtures import postgres
from tests.fixtures.container import engine_env

ROOT = Path(__file__).resolve().parents[1]


def _manifest(name: str, kind: str, path: str) -> dict:
    docs = yaml.safe_load_all((ROOT / path).read_text())
    return next(d for d in docs if d and d["kind"] == kind and d["metadata"]["name"] == name)


def _expand(value: str, env: dict[str, str]) -> str:
    """kubelet's $(VAR) expansion: only from variables defined earlier in the list."""
    return re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: env.get(m.group(1), m.group(0)), value)


def _container_env(spec: dict, secrets_: dict[str, str]) -> dict[str, str]:
    """The container's environment in order, Secret references answered from ``secrets_`` (by key)."""
    env: dict[str, str] = {}
    for entry in spec["env"]:
        if "value" in entry:
            env[entry["name"]] = _expand(entry["value"], env)
        else:
            env[entry["name"]] = secrets_[entry["valueFrom"]["secretKeyRef"]["key"]]
    return env


@pytest.fixture
def databases():
    """The two databases of k8s/base/postgres.yaml's init script: the tracking store and the auth store."""
    reason = postgres.postgres_available()
    if reason is not None:
        pytest.skip(reason)
    names = [f"m2snet_tracking_{secrets.token_hex(4)}", f"m2snet_auth_{secrets.token_hex(4)}"]
    for name in names:
        postgres.create_database(name)
    try:
        yield names
    finally:
        for name in names:
            postgres.drop_database(name)


@pytest.mark.container
def test_the_tracking_server_runs_from_its_image_as_the_manifest_says(tracking_image, s3_server, databases,
                                                                      tmp_path, monkeypatch):
    from mlflow import MlflowClient

    engine, tag = tracking_image
    backend_db, auth_db = databases
    spec = _manifest("mlflow", "Deployment", "k8s/base/mlflow.yaml")["spec"]["template"]["spec"]
    container = spec["containers"][0]
    assert container["image"] == tag
    admin_password = secrets.token_urlsafe(12)
    # The Secret's basic_auth.ini template with this machine's values in place of the CHANGE-ME ones.
    auth_ini = _manifest("mlflow-auth", "Secret", "k8s/base/secrets.yaml")["stringData"]["basic_auth.ini"]
    auth_ini = (auth_ini.replace("mlflow:CHANGE-ME-postgres-password@postgres:5432/mlflow_auth",
                                 f"postgres@127.0.0.1:5432/{auth_db}")
                .replace("CHANGE-ME-mlflow-admin-password", admin_password))
    assert "CHANGE-ME" not in auth_ini
    config_dir = tmp_path / "etc-mlflow"
    config_dir.mkdir()
    (config_dir / "basic_auth.ini").write_text(auth_ini)
    config_dir.chmod(0o755)
    (config_dir / "basic_auth.ini").chmod(0o644)  # the pod's user (1000) reads it; a Secret volume is 0644
    env = _container_env(container, {
        "POSTGRES_USER": "postgres", "POSTGRES_PASSWORD": "", "POSTGRES_DB": backend_db,
        "AWS_ACCESS_KEY_ID": s3_server.access_key, "AWS_SECRET_ACCESS_KEY": s3_server.secret_key,
        "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(16)})
    # In-cluster names -> this machine's loopback services.
    env["MLFLOW_BACKEND_STORE_URI"] = env["MLFLOW_BACKEND_STORE_URI"].replace("@postgres:5432", "@127.0.0.1:5432")
    env["MLFLOW_S3_ENDPOINT_URL"] = s3_server.endpoint_url
    port = free_port()
    args = [a.replace("--port=5000", f"--port={port}").replace("s3://mlflow/", f"s3://{s3_server.bucket}/")
            for a in container["args"]]
    mount = container["volumeMounts"][0]["mountPath"]
    name = f"m2snet-tracking-test-{port}"
    context = spec["securityContext"]

    def podman(*a: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run([engine, *a], env=engine_env(), capture_output=True, text=True, timeout=timeout)

    started = podman("run", "-d", "--name", name, "--network", "host",
                     "--user", f"{context['runAsUser']}:{context['runAsGroup']}",
                     "--memory", container["resources"]["limits"]["memory"].replace("Gi", "g"),
                     "--volume", f"{config_dir}:{mount}:ro", *[f"--env={k}={v}" for k, v in env.items()],
                     "--entrypoint", container["command"][0], tag, *container["command"][1:], *args)
    assert started.returncode == 0, started.stderr
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 180
        while True:
            state = podman("inspect", "--format", "{{.State.Running}}", name).stdout.strip()
            logs = podman("logs", name)
            assert state == "true", (logs.stdout + logs.stderr)[-3000:]
            try:
                if requests.get(f"{url}{container['readinessProbe']['httpGet']['path']}", timeout=2).ok:
                    break
            except requests.ConnectionError:
                pass
            assert time.time() < deadline, (logs.stdout + logs.stderr)[-3000:]
            time.sleep(2)
        assert requests.get(f"{url}/api/2.0/mlflow/experiments/search?max_results=1", timeout=10).status_code == 401
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", admin_password)
        client = MlflowClient(tracking_uri=url)
        experiment = client.create_experiment("tracking-image")
        run = client.create_run(experiment)
        client.log_param(run.info.run_id, "model", "m2snet")
        client.log_metric(run.info.run_id, "cv_dice", 0.5)
        (tmp_path / "note.txt").write_text("kept in S3\n")
        client.log_artifact(run.info.run_id, str(tmp_path / "note.txt"))
        client.set_terminated(run.info.run_id)
        kept = client.get_run(run.info.run_id)
        assert kept.data.params == {"model": "m2snet"} and kept.data.metrics == {"cv_dice": 0.5}
        back = client.download_artifacts(run.info.run_id, "note.txt", str(tmp_path / "back"))
        assert Path(back).read_text() == "kept in S3\n"
        keys = [o["Key"] for o in s3_server.client().list_objects_v2(Bucket=s3_server.bucket).get("Contents", [])]
        assert any(k.endswith(f"{run.info.run_id}/artifacts/note.txt") for k in keys), keys
        # Nothing of the pipeline's in it: no torch, so the image stays small.
        assert podman("run", "--rm", "--entrypoint", "python3", tag, "-c", "import torch").returncode != 0
    finally:
        podman("rm", "-f", name)
    assert podman("container", "exists", name).returncode != 0
