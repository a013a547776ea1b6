"""The component image, built and used for real: docker/build.sh, then the TINY pipeline with every
step in a container of it (kfp's DockerRunner on podman or docker), against a real `mlflow server` +
SeaweedFS on the host's loopback.

The image tests are opt-in (marker ``container``, ``make test-container``; .ci/run runs them): they
need podman (or a docker daemon). Measured on the 2-core box: 9 min on a machine without the image
(docker/build.sh 369 s: the debootstrap base 81 s, the layers 288 s; then the pipeline 137 s), about
6 min with the image cached (only layers whose files changed are rebuilt).
"""

from __future__ import annotations

import json
import os
import subprocess
import time

import pytest

from m2snet.errors import M2SNetError
from tests.fixtures.container import engine_env as _engine_env

EXPERIMENT = "container-test"
MODEL = "m2snet-tiny-container"
# At least prepare, split, tune, 4 x (train, evaluate), aggregate, register, promote.
MIN_TINY_STEPS = 3 + 2 * 4 + 3


@pytest.mark.container
def test_image_runs_the_cli_as_a_non_root_user(image):
    engine, tag = image
    proc = subprocess.run([engine, "run", "--rm", tag, "m2snet", "--help"], env=_engine_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "pipeline" in proc.stdout and "Usage" in proc.stdout
    ids = subprocess.run([engine, "run", "--rm", tag, "id", "-u"], env=_engine_env(),
                         capture_output=True, text=True, timeout=300)
    assert ids.stdout.strip() == "1000"


def test_container_runner_refuses_a_tracking_store_the_containers_cannot_reach(tmp_path):
    from m2snet.kubeflow.runner import LocalRunOptions, run_local

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
        with pytest.raises(M2SNetError, match="MLflow tracking server"):
            run_local(LocalRunOptions("tiny", work_dir=tmp_path / "run", runner="container"))


def test_steps_get_the_tracking_and_storage_settings_but_not_the_rest_of_the_environment():
    from m2snet.kubeflow.container import step_environment

    env = step_environment({"MLFLOW_TRACKING_URI": "http://127.0.0.1:5000", "AWS_ACCESS_KEY_ID": "k",
                            "M2SNET_OPTUNA_STORAGE": "postgresql://db", "PATH": "/host/bin", "SSH_AUTH_SOCK": "/x"})
    assert env == {"MLFLOW_TRACKING_URI": "http://127.0.0.1:5000", "AWS_ACCESS_KEY_ID": "k",
                   "M2SNET_OPTUNA_STORAGE": "postgresql://db", "HOME": "/tmp"}


def test_unknown_runner_is_a_one_line_error(tmp_path):
    import sys

    proc = subprocess.run([sys.executable, "-m", "m2snet.cli", "pipeline", "run", "--local", "--preset", "tiny",
                           "--runner", "vm", "--work-dir", str(tmp_path / "run")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["error: unknown runner 'vm'; choose one of ['subprocess', 'container']"]
    assert not (tmp_path / "run").exists()


def _started_containers(engine: str, tag: str, since: float, until: float) -> list[dict]:
    # podman 4.3: `--stream=false` ends the listing (its --until and image filter miss events); docker: --until.
    end = ["--stream=false"] if engine == "podman" else ["--until", str(int(until) + 1)]
    proc = subprocess.run([engine, "events", "--since", str(int(since)), *end, "--filter", "event=start",
                           "--format", "{{json .}}"], env=_engine_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    events = [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]
    return [e for e in events if (e.get("Image") or e.get("from")) == tag]


@pytest.mark.container
def test_tiny_pipeline_runs_every_step_in_the_image_and_registers_a_model(image, mlflow_server, tmp_path):
    from mlflow import MlflowClient

    from m2snet.kubeflow.runner import LocalRunOptions, run_local
    from m2snet.workflows.presets import get_preset

    engine, tag = image
    since = time.time() - 1
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", mlflow_server.url)
        mp.chdir(tmp_path)
        result = run_local(LocalRunOptions("tiny", work_dir=tmp_path / "run", experiment=EXPERIMENT,
                                           model_name=MODEL, runner="container", keep_intermediates=True))
    started = _started_containers(engine, tag, since, time.time())
    print(f"\ncontainer runner: {len(started)} step containers, {result.seconds:.0f} s, "
          f"model {MODEL} version {result.version}")
    # Every step ran in a container of the image, once: one container per task that wrote its outputs.
    tasks = list(result.pipeline_root.rglob("executor_output.json"))
    assert len(tasks) >= MIN_TINY_STEPS
    assert len(started) == len(tasks), ([e.get("Name") for e in started], tasks)

    client = MlflowClient(tracking_uri=mlflow_server.url, registry_uri=mlflow_server.url)
    mv = client.get_model_version(MODEL, result.version)
    assert mv.tags["pipeline_run_id"] == result.pipeline_run_id and mv.tags["n_folds"] == "4"
    # The promote step ran in the image and applied the gate: a 1-epoch model that learns nothing is
    # refused by the no-skill rule; one it promotes beats its no-skill Dice by the margin.
    cv, noskill = float(mv.tags["cv_dice"]), float(mv.tags["noskill_dice"])
    margin = get_preset("tiny").promotion.noskill_margin
    assert 0.0 <= cv <= 1.0
    if result.promoted:
        assert cv >= noskill + margin, result.promotion
    else:
        assert cv < noskill + margin and "no-skill rule" in result.promotion, result.promotion
    parent = client.get_run(result.parent_run_id)
    assert parent.info.status == "FINISHED" and "cv_dice_mean" in parent.data.metrics
    folds = [r for r in client.search_runs([parent.info.experiment_id])
             if r.data.tags.get("m2snet.kind") == "fold"
             and r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(r.data.tags["m2snet.fold"] for r in folds) == ["0", "1", "2", "3"]
    assert all(r.info.status == "FINISHED" and "dice" in r.data.metrics for r in folds)
    # The steps wrote their outputs as the caller (not the image's uid 1000) into the kfp root.
    outputs = [p for p in result.pipeline_root.rglob("*") if p.is_file()]
    assert outputs and all(p.stat().st_uid == os.getuid() for p in outputs)


@pytest.mark.container
def test_a_failed_step_keeps_its_exit_status_and_its_container_goes_with_the_run(image):
    """kfp starts steps with auto_remove and then asks for the exit status: without the proxy a step that
    ended first is gone (podman: a 500; docker: a 404 that kfp takes for success). Through the proxy kfp's
    own, unmodified function reads the real status, and the run's containers are removed at its end."""
    from kfp.local.docker_task_handler import run_docker_container

    import docker
    from m2snet.kubeflow.container import docker_api
    from m2snet.kubeflow.engine_proxy import RUN_LABEL, EngineProxy

    _, tag = image
    with docker_api() as engine:
        # A container the run did not create (another run's, the user's): the run's clean-up leaves it be.
        upstream = docker.DockerClient(base_url=engine)
        foreign = upstream.containers.create(tag, ["true"], labels={RUN_LABEL: "another-run"})
        proxy = EngineProxy(engine)
        with proxy as url:
            client = docker.DockerClient(base_url=url)
            try:
                assert run_docker_container(client, tag, ["sh", "-c", "echo step; exit 3"], volumes={}) == 3
                assert run_docker_container(client, tag, ["true"], volumes={}) == 0
            finally:
                client.close()
        try:
            left = upstream.containers.list(all=True, filters={"label": f"{RUN_LABEL}={proxy.token}"})
            foreign.reload()  # raises NotFound had the clean-up removed it
            assert foreign.labels[RUN_LABEL] == "another-run"
        finally:
            foreign.remove(force=True)
            upstream.close()
    assert left == []
