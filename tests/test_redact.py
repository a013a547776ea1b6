"""No credentials in logs or MLflow: the one ``redact`` and the places that log or store a data source."""

from __future__ import annotations

import json
import logging

import pytest

from m2snet.redaction import redact

SECRET = "s3cr3t-Value"


@pytest.mark.parametrize("url, shown", [
    ("https://user:s3cr3t-Value@host/org/data.git", "https://user:***@host/org/data.git"),
    # a token alone as the userinfo (GitHub / GitLab personal access tokens)
    ("https://s3cr3t-Value@github.com/org/data.git", "https://***@github.com/org/data.git"),
    # a password holding "@": all of it goes, not only what follows the last "@"
    ("postgresql://mlflow:p@ss-s3cr3t-Value@db:5432/optuna", "postgresql://mlflow:***@db:5432/optuna"),
    ("https://host/data?password=s3cr3t-Value&rev=v1", "https://host/data?password=***&rev=v1"),
    ("https://host/data?rev=v1&token=s3cr3t-Value", "https://host/data?rev=v1&token=***"),
    ("s3://bucket/x?access_key=AKIA&secret_key=s3cr3t-Value", "s3://bucket/x?access_key=***&secret_key=***"),
    ("https://b.s3.amazonaws.com/k?X-Amz-Credential=AKIA&X-Amz-Signature=s3cr3t-Value",
     "https://b.s3.amazonaws.com/k?X-Amz-Credential=***&X-Amz-Signature=***"),
    # inside a longer text (a log line, a data-source description)
    ("dvc:https://s3cr3t-Value@github.com/org/data@v1:data/busi", "dvc:https://***@github.com/org/data@v1:data/busi"),
])
def test_redact_masks_credentials(url, shown):
    assert redact(url) == shown
    assert "s3cr3t" not in redact(url)


@pytest.mark.parametrize("harmless", [
    "https://github.com/org/data.git", "https://host/data?rev=v1&path=data/busi", "sqlite:///tmp/mlflow.db",
    "s3://mlflow/artifacts", "/data/busi", "models:/m2snet@production", "journal:/tmp/optuna.log", "",
])
def test_redact_leaves_harmless_values_unchanged(harmless):
    assert redact(harmless) == harmless


def test_redact_passes_non_strings_through():
    assert redact(3) == 3 and redact(None) is None


def test_flatten_params_masks_token_urls():
    from m2snet.mlops.tracking import flatten_params

    flat = flatten_params({"data_source": f"dvc:https://{SECRET}@github.com/org/data@v1:data/busi",
                           "storage": f"postgresql://u:p@{SECRET}@db/optuna"})
    assert SECRET not in json.dumps(flat)


def _everything_stored(client, run_id: str) -> str:
    """Every param, tag and dataset input of a run, as one string."""
    run = client.get_run(run_id)
    inputs = [{"name": i.dataset.name, "source": i.dataset.source, "digest": i.dataset.digest,
               "tags": {t.key: t.value for t in i.tags}} for i in run.inputs.dataset_inputs]
    return json.dumps({"params": run.data.params, "tags": run.data.tags, "inputs": inputs})


def test_dataset_input_source_with_credentials_is_not_stored(tmp_path, monkeypatch, caplog):
    """A DVC repository given with a password or token reaches neither MLflow nor the console."""
    from m2snet.mlops.lineage import DatasetLineage
    from m2snet.mlops.mlflow_store import TrackingConfig
    from m2snet.mlops.tracking import Tracker

    monkeypatch.chdir(tmp_path)
    cfg = TrackingConfig(uri=f"sqlite:///{tmp_path / 'mlflow.db'}", experiment="secrets")
    caplog.set_level(logging.DEBUG)
    with Tracker.start(cfg, run_name="parent") as parent:
        parent.log_dataset(DatasetLineage(name="busi", digest="0" * 32, uri=f"https://user:{SECRET}@host/org/data",
                                          dvc_rev="v1", dvc_path="data/busi"),
                           tags={"source": f"https://{SECRET}@host/org/data"})
        with parent.child("fold-0") as child:
            # what a fold run logs: its parent's inputs, read back
            for lineage in parent.dataset_inputs():
                child.log_dataset(lineage, tags={"fold": 0})
            child_id = child.run_id
        stored = _everything_stored(parent.client, parent.run_id) + _everything_stored(parent.client, child_id)
    assert SECRET not in stored
    assert "https://user:***@host/org/data" in stored  # still says where the data came from
    assert SECRET not in caplog.text


def test_dvc_source_with_credentials_stays_out_of_errors_and_logs(tmp_path, monkeypatch, caplog):
    """``prepare_dataset`` from a DVC repository that cannot be reached: the error names it without its token."""
    from m2snet.errors import M2SNetError
    from m2snet.processes import free_port
    from m2snet.workflows.steps import prepare_dataset

    monkeypatch.chdir(tmp_path)
    caplog.set_level(logging.DEBUG)
    repo = f"https://{SECRET}@127.0.0.1:{free_port()}/org/data.git"
    with pytest.raises(M2SNetError) as err:
        prepare_dataset(tmp_path / "out", dvc_repo=repo, dvc_rev="v1")
    assert "127.0.0.1" in str(err.value) and SECRET not in str(err.value)
    assert SECRET not in caplog.text


def test_services_log_the_backend_store_without_its_password():
    """The services module masks with the same helper (it had a copy that missed token-only URLs)."""
    import m2snet.mlops.services as services

    assert not hasattr(services, "_redact")
    assert services.redact is redact


def test_mlflow_server_backend_uri_is_not_on_its_command_line(tmp_path):
    """A PostgreSQL backend URI holds the password: ``ps`` shows argv to every user, so it goes in the environment."""
    import os
    from pathlib import Path

    from m2snet.mlops.services import start_mlflow_server

    backend = f"sqlite:///{tmp_path / 'mlflow.db'}"
    server = start_mlflow_server(backend, str(tmp_path / "artifacts"), workdir=tmp_path)
    try:
        cmdline = Path(f"/proc/{server.process.pid}/cmdline").read_bytes().decode().split("\0")
        assert "server" in cmdline and not any("mlflow.db" in arg for arg in cmdline)
        assert (tmp_path / "mlflow.db").is_file()  # the server did use the backend it was given
    finally:
        server.stop()
    assert os.environ.get("MLFLOW_BACKEND_STORE_URI") is None  # the caller's environment is left alone


def test_params_and_tags_mask_urls_inside_lists_and_dicts():
    from m2snet.mlops.tracking import flatten_params

    assert SECRET not in json.dumps(flatten_params({"sources": [f"https://{SECRET}@host/a", "/data/b"]}))


# --- one redaction for everything that leaves the process (issue 29, item 2) -------------------------------
LEAKS = ("hunter7", "tok_x", "pw@")  # the secrets: a password, a query token, a password before "@"


def _cli(*args: str, cwd, env: dict[str, str], timeout: float = 300):
    import os
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "m2snet.cli", *args], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=timeout)


def _files_holding(root, words=LEAKS) -> list[str]:
    """Every file under ``root`` (logs, the MLflow store and its artifacts, kfp outputs) holding a secret."""
    from pathlib import Path

    found = []
    for path in Path(root).rglob("*"):
        if path.is_file() and not path.is_symlink():
            data = path.read_bytes()
            found += [f"{path}: {w}" for w in words if w.encode() in data]
    return found


def test_redact_masks_secret_values_from_the_environment(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wJalrXUtnFEMI/K7MDENG")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "hunter7")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://alice:pw-s3cr3t@tracking:5000")
    monkeypatch.setenv("M2SNET_TEST_TOKEN", "abc")  # too short to mask wherever it appears
    text = "boto: signature mismatch for wJalrXUtnFEMI/K7MDENG; login hunter7 refused; pw-s3cr3t; abc"
    shown = redact(text)
    assert "wJalrXUtnFEMI" not in shown and "hunter7" not in shown and "pw-s3cr3t" not in shown
    assert shown.endswith("; abc")
    # the working directory is named like a secret (PWD) but is none
    monkeypatch.setenv("PWD", "/home/alice/project")
    assert redact("/home/alice/project/data") == "/home/alice/project/data"


def test_redact_ends_a_query_value_at_a_quote():
    assert redact("Failed to clone repo 'https://h/d.git?token=tok_x' to '/tmp/x'") == \
        "Failed to clone repo 'https://h/d.git?token=***' to '/tmp/x'"


def test_cli_error_line_and_library_warnings_are_masked(tmp_path):
    """`MLFLOW_TRACKING_URI=http://alice:pw@...?token=... m2snet promote M 1`: neither urllib3's retry warnings
    nor the error line show the password or the token."""
    from m2snet.processes import free_port

    uri = f"http://alice:pw@127.0.0.1:{free_port()}/?token=tok_x"
    proc = _cli("promote", "M", "1", cwd=tmp_path, env={"MLFLOW_TRACKING_URI": uri})
    assert proc.returncode == 2, proc.stderr
    out = proc.stdout + proc.stderr
    assert "Retrying" in out and "error: " in out  # the warning and the error line were printed, masked
    assert "alice:***@127.0.0.1" in out and "token=***" in out
    assert not [w for w in LEAKS if w in out], out


def test_python_warnings_and_tracebacks_in_logs_are_masked(tmp_path):
    """After install_redaction, a library's ``warnings.warn`` and a logged exception's traceback are masked,
    whichever handler writes them."""
    code = """
import logging, warnings
from m2snet.redaction import install_redaction
install_redaction()
logging.basicConfig()
warnings.warn("retrying https://alice:hunter7@host/d.git?token=tok_x")
try:
    raise ValueError("cannot reach https://alice:hunter7@host/x")
except ValueError:
    logging.getLogger("mlflow.store").exception("upload failed")
"""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "UserWarning" in proc.stderr and "ValueError: cannot reach https://alice:***@host/x" in proc.stderr
    assert not [w for w in LEAKS if w in proc.stderr], proc.stderr


def test_text_artifacts_are_uploaded_masked(tmp_path, monkeypatch):
    """A log file a library wrote with a secret in it reaches MLflow masked (the file itself is not changed)."""
    from m2snet.mlops.mlflow_store import TrackingConfig
    from m2snet.mlops.tracking import Tracker

    monkeypatch.chdir(tmp_path)
    log_file = tmp_path / "tool.log"
    log_file.write_text("cloning https://alice:hunter7@host/d.git?token=tok_x\n")
    cfg = TrackingConfig(uri=f"sqlite:///{tmp_path / 'mlflow.db'}", experiment="masked-artifacts")
    with Tracker.start(cfg, run_name="r") as run:
        run.log_artifact(log_file, "logs")
    uploaded = next((tmp_path / "mlruns").rglob("logs/tool.log")).read_text()
    assert uploaded == "cloning https://alice:***@host/d.git?token=***\n"
    assert "hunter7" in log_file.read_text()


def test_pipeline_dvc_credentials_reach_no_log_nor_artifact(tmp_path):
    """The issue's repro: `pipeline run --local --dvc-repo 'https://alice:hunter7@host/d.git?token=tok_x'` fails
    cloning; the task's log, the runner's log, the MLflow store and its artifacts hold neither secret, and
    the failed task's log is still uploaded, naming the repository."""
    repo = "https://alice:hunter7@127.0.0.1:9/d.git?token=tok_x"
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    proc = _cli("pipeline", "run", "--local", "--preset", "tiny", "--dvc-repo", repo, "--dvc-rev", "v1",
                "--work-dir", str(tmp_path / "work"), cwd=tmp_path, env=env)
    assert proc.returncode == 2 and "prepare" in proc.stderr, proc.stdout + proc.stderr
    assert not [w for w in LEAKS if w in proc.stdout + proc.stderr]
    uploaded = list(tmp_path.rglob("artifacts/logs/prepare-dataset.log"))
    assert uploaded and "alice:***@127.0.0.1:9/d.git?token=***" in uploaded[0].read_text()
    assert _files_holding(tmp_path) == []
