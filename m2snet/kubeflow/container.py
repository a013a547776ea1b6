"""Run the pipeline's steps in the component image: kfp's local DockerRunner on docker or podman.

``m2snet pipeline run --local --runner container`` runs every step in ``COMPONENT_IMAGE``
(docker/build.sh builds it) instead of a subprocess of this Python, the way a Kubeflow cluster runs
them. kfp's DockerRunner talks to a Docker-compatible API (the ``docker`` SDK): ``$DOCKER_HOST`` or
the docker socket when one answers, else a ``podman system service`` started for the run on a private
socket and stopped after it. kfp is pointed at an :class:`~m2snet.kubeflow.engine_proxy.EngineProxy` in
front of that API, which keeps each step's container until kfp has read its exit status (kfp asks for
auto-removal, which loses a failed step's status) and removes the run's containers at its end.

The containers share the host's network (``--network host``), so the MLflow server and SeaweedFS on
the host's loopback are reachable exactly as from the host; the kfp pipeline root is mounted at the
same path (kfp does that), and so are ``data_path`` (read-only) and the local console's progress-events
folder (``$M2SNET_PROGRESS_FILE``'s, inherited through the forwarded ``M2SNET_`` variables). Steps run as
the calling user's uid:gid so the task outputs stay the caller's.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path

from m2snet import progress
from m2snet.errors import M2SNetError
from m2snet.kubeflow.engine_proxy import EngineProxy
from m2snet.kubeflow.process_state import environment
from m2snet.mlops.services import ManagedProcess

log = logging.getLogger(__name__)

# The environment a step needs from the caller's: the tracking server (and its credentials), S3
# credentials for DVC and MLflow, and m2snet's own settings (e.g. M2SNET_OPTUNA_STORAGE).
FORWARDED_ENV_PREFIXES = ("MLFLOW_", "AWS_", "M2SNET_")
# podman settings that work in unprivileged sandboxes (runc, lowered ulimits); used when the caller
# sets no CONTAINERS_CONF and runc is installed.
PODMAN_CONF = Path(__file__).resolve().parents[2] / "docker" / "containers.conf"  # in a checkout
BUILD_HINT = "build it with docker/build.sh (or `make image`)"


def _ping(base_url: str) -> bool:
    import docker

    try:
        client = docker.DockerClient(base_url=base_url, timeout=5)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except Exception:  # noqa: BLE001 - any failure means "not this endpoint"
        return False


@contextlib.contextmanager
def docker_api() -> Iterator[str]:
    """A Docker-compatible API URL for the run: ``$DOCKER_HOST``, the docker socket, or podman's service."""
    host = os.environ.get("DOCKER_HOST")
    if host:
        if not _ping(host):
            raise M2SNetError(f"DOCKER_HOST={host} does not answer; unset it to use podman, or start that engine")
        yield host
        return
    if Path("/var/run/docker.sock").exists() and _ping("unix:///var/run/docker.sock"):
        yield "unix:///var/run/docker.sock"
        return
    podman = shutil.which("podman")
    if podman is None:
        raise M2SNetError("--runner container needs docker (a running daemon) or podman "
                          "(apt-get install podman runc); neither was found")

    # A short private path: unix socket paths are limited to ~107 bytes.
    tmp = Path(tempfile.mkdtemp(prefix="m2snet-podman-"))
    url = f"unix://{tmp / 'api.sock'}"
    env = {}
    if "CONTAINERS_CONF" not in os.environ and PODMAN_CONF.is_file() and shutil.which("runc"):
        env["CONTAINERS_CONF"] = str(PODMAN_CONF)
    proc = ManagedProcess("podman", [podman, "system", "service", "--time=0", url], tmp / "podman.log", env=env)
    try:
        proc.wait_ready(lambda: _ping(url), 30.0, f"podman's Docker API on {url}")
        log.info("podman system service on %s", url)
        yield url
    finally:
        proc.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def step_environment(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """What a step container gets from the caller's environment (plus a writable HOME)."""
    environ = os.environ if environ is None else environ
    env = {k: v for k, v in environ.items() if k.startswith(FORWARDED_ENV_PREFIXES)}
    # The caller's uid may have no home in the image: caches (matplotlib, torch) go to /tmp.
    env["HOME"] = "/tmp"
    return env


def check_tracking_uri(uri: str) -> None:
    """The containers reach MLflow over HTTP; a SQLite file or ./mlruns of the host is not theirs."""
    if not uri.startswith(("http://", "https://")):
        raise M2SNetError(
            f"--runner container: the steps run in containers and need an MLflow tracking server, not {uri}; "
            "start one with `m2snet services up` and export the MLFLOW_TRACKING_URI (and AWS_*) it prints")


@contextlib.contextmanager
def container_runner(image: str, *, data_path: str = "", tracking_uri: str) -> Iterator[object]:
    """A kfp ``DockerRunner`` that runs ``image`` through docker or podman, for the duration of a run."""
    from kfp import local

    import docker

    check_tracking_uri(tracking_uri)
    mounts = []
    if data_path:
        src = str(Path(data_path).resolve())
        mounts.append(docker.types.Mount(target=src, source=src, type="bind", read_only=True))
    if progress.enabled():  # the steps append their progress events to the console's file, at the same path
        events_dir = str(Path(os.environ[progress.ENV]).parent)
        mounts.append(docker.types.Mount(target=events_dir, source=events_dir, type="bind", read_only=False))
    with docker_api() as engine, EngineProxy(engine) as url:
        _require_image(engine, image)
        # kfp's handler calls docker.from_env() per task: it talks to the proxy.
        with environment(DOCKER_HOST=url):
            yield local.DockerRunner(
                network_mode="host", user=f"{os.getuid()}:{os.getgid()}",
                environment={**step_environment(), "MLFLOW_TRACKING_URI": tracking_uri}, mounts=mounts,
            )


def _require_image(url: str, image: str) -> None:
    # kfp would try to pull a missing image; ours is built locally (or pushed by CI), so say how.
    import docker

    client = docker.DockerClient(base_url=url, timeout=30)
    try:
        client.images.get(image)
    except docker.errors.ImageNotFound:
        raise M2SNetError(f"image {image} not found on {url}; {BUILD_HINT}") from None
    finally:
        client.close()
