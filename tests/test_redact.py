"""No credentials in logs or MLflow: the one ``redact`` and the places that log or store a data source."""

from __future__ import annotations

import json
import logging

import pytest

from m2snet.common import redact

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
    from m2snet.mlops.tracking import DatasetLineage, Tracker, TrackingConfig

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
    from m2snet.common import M2SNetError, free_port
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
