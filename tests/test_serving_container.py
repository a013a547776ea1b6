"""The production model served from the component image, as the cluster's Deployment runs it
(k8s/overlays/serving/serving.yaml: its command, arguments, settings and memory limit), against a real
`mlflow server` + SeaweedFS on loopback: promote v2 and replace the container (what `kubectl rollout restart`
does: a new pod) -> the endpoint answers as v2; roll back and replace it -> v1.

Opt-in (marker ``container``, ``make test-container``): it needs podman (or a docker daemon) and builds the image.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest
import requests
import yaml

from m2snet.processes import free_port
from tests.fixtures.container import engine_env

ROOT = Path(__file__).resolve().parents[1]
MODEL = "m2snet-serve-container"


def _serving_container() -> dict:
    docs = yaml.safe_load_all((ROOT / "k8s" / "overlays" / "serving" / "serving.yaml").read_text())
    deployment = next(d for d in docs if d and d["kind"] == "Deployment")
    return deployment["spec"]["template"]["spec"]["containers"][0]


def _podman_args(spec: dict, port: int, tracking_uri: str) -> list[str]:
    """`run` arguments for the Deployment's container: its command and arguments (model and port replaced), its
    plain settings, the Secret's tracking URI from the test's server, its memory limit, an emptyDir-like /cache."""
    args = [a.replace("m2snet-busi", MODEL).replace("--port=8080", f"--port={port}") for a in spec["args"]]
    env = {e["name"]: e["value"] for e in spec["env"] if "value" in e}
    env["MLFLOW_TRACKING_URI"] = tracking_uri
    memory = spec["resources"]["limits"]["memory"].replace("Gi", "g")
    return ["--network", "host", "--memory", memory, "--tmpfs", "/cache:rw,mode=1777",
            *[f"--env={k}={v}" for k, v in env.items()], "--entrypoint", spec["command"][0], "IMAGE",
            *spec["command"][1:], *args]


@pytest.fixture
def two_versions(mlflow_server, tmp_path):
    """v1 (promoted to production) and v2 (registered, not promoted) of a 1-epoch tiny model, logged through the
    tracking server (artifacts in SeaweedFS)."""
    import mlflow

    from m2snet.data.demo import make_demo_dataset
    from m2snet.data.importers import import_dataset
    from m2snet.data.split import make_split
    from m2snet.mlops.promotion_gate import PromotionPolicy
    from m2snet.mlops.pyfunc_logging import log_segmentation_model
    from m2snet.mlops.registry import promote, register_model_version
    from m2snet.training.trainer import train
    from m2snet.workflows.presets import train_config

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", mlflow_server.url)
        mp.chdir(tmp_path)
        mlflow.set_tracking_uri(mlflow_server.url)
        make_demo_dataset(tmp_path / "raw", n_per_class=3, size=64)
        import_dataset("busi", tmp_path / "raw", tmp_path / "ds", progress=False)
        make_split(tmp_path / "ds", n_folds=2, seed=0, out=tmp_path / "split.json")
        result = train(train_config("tiny", data=str(tmp_path / "ds"), split=str(tmp_path / "split.json"), fold=0,
                                    out_dir=str(tmp_path / "fold0")))
        mlflow.set_experiment("serving-container-test")
        versions = []
        for key in ("v1", "v2"):
            with mlflow.start_run() as run:
                info = log_segmentation_model([result.checkpoint], run_id=run.info.run_id)
            versions.append(register_model_version(info.model_uri, MODEL, idempotency_key=f"serving-{key}",
                                                   tags={"cv_dice": 0.9, "noskill_dice": 0.2}).version)
        assert promote(MODEL, versions[0], PromotionPolicy(floor=0.0)).promoted
        yield versions, tmp_path / "raw" / "benign" / "benign (1).png"
        mlflow.set_tracking_uri(None)


@pytest.mark.container
def test_the_serving_container_answers_as_the_promoted_version_and_follows_promote_and_rollback(
        image, mlflow_server, two_versions):
    from m2snet.mlops.promotion_gate import PromotionPolicy
    from m2snet.mlops.registry import promote, rollback
    from m2snet.mlops.serving import request_predictions

    engine, tag = image
    (v1, v2), picture = two_versions
    port = free_port()
    name = f"m2snet-serve-test-{port}"
    run = [a if a != "IMAGE" else tag for a in _podman_args(_serving_container(), port, mlflow_server.url)]
    url = f"http://127.0.0.1:{port}"

    def podman(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        return subprocess.run([engine, *args], env=engine_env(), capture_output=True, text=True, timeout=timeout)

    def answers_as() -> str:
        deadline = time.time() + 300
        while time.time() < deadline:
            state = podman("inspect", "--format", "{{.State.Running}}", name).stdout.strip()
            assert state == "true", podman("logs", name).stdout[-3000:] + podman("logs", name).stderr[-3000:]
            try:
                if requests.get(f"{url}/ping", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                time.sleep(2)
        rows = request_predictions(url, [picture])
        assert rows[0]["mask"].shape[:2] == (64, 64)
        return rows[0]["model_version"]

    def rollout() -> None:
        """What `kubectl rollout restart` does: a new pod (a new container, a fresh /cache), the old one gone."""
        podman("rm", "-f", name)
        started = podman("run", "-d", "--name", name, *run)
        assert started.returncode == 0, started.stderr

    rollout()
    try:
        assert answers_as() == f"{MODEL}/{v1}"
        assert promote(MODEL, v2, PromotionPolicy(floor=0.0, margin=0.0)).promoted
        assert answers_as() == f"{MODEL}/{v1}"  # resolved at start: a running server keeps its version
        rollout()
        assert answers_as() == f"{MODEL}/{v2}"
        rollback(MODEL)
        rollout()
        assert answers_as() == f"{MODEL}/{v1}"
        memory = podman("inspect", "--format", "{{.HostConfig.Memory}}", name).stdout.strip()
        assert int(memory) == 3 * 2**30  # the Deployment's limit, bounding what the request budget admits
    finally:
        podman("rm", "-f", name)
    assert podman("container", "exists", name).returncode != 0
