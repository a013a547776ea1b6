"""A tracking store the commands cannot use gives one line ``error: ...`` and exit 2, before any work:
an unknown URI scheme, a read-only store (issue 29, item 7)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import make_tiny_dataset


def _m2snet(*args: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "m2snet.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300, env={**os.environ, **env})


def _one_error_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-3000:]
    return lines[0]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_dataset(tmp_path_factory.mktemp("tracking-errors"), n_per_class=(2, 2, 2), size=32)


def _train_args(tiny, out: Path) -> list[str]:
    ds, split = tiny
    return ["train", "--data", str(ds), "--split", str(split), "--epochs", "1", "--size", "32", "--batch-size", "2",
            "--out", str(out), "--set", "pretrained=false", "--set", "lossnet_pretrained=false"]


def test_an_unknown_tracking_uri_scheme_is_one_line(tiny, tmp_path):
    env = {"MLFLOW_TRACKING_URI": "bogus://x"}
    line = _one_error_line(_m2snet("promote", "M", "1", cwd=tmp_path, env=env))
    assert "'bogus://x'" in line and "scheme 'bogus'" in line
    line = _one_error_line(_m2snet(*_train_args(tiny, tmp_path / "run"), cwd=tmp_path, env=env))
    assert "scheme 'bogus'" in line
    assert not (tmp_path / "run" / "model.pt").exists()  # refused before training


@pytest.fixture()
def read_only_store(tmp_path):
    """A SQLite tracking store holding model ``M`` version 1, in a folder nobody may write: chmod for a
    normal user; root ignores modes, so there the folder and file are made immutable (chattr +i)."""
    from mlflow import MlflowClient

    store = tmp_path / "store"
    store.mkdir()
    uri = f"sqlite:///{store / 'mlflow.db'}"
    client = MlflowClient(uri, registry_uri=uri)
    run = client.create_run(client.create_experiment("e"))
    client.create_registered_model("M")
    client.create_model_version("M", f"runs:/{run.info.run_id}/model", run_id=run.info.run_id)
    client._tracking_client.store.engine.dispose()  # no open handle on the file while it turns read-only
    paths = [store / "mlflow.db", store]
    if os.geteuid() != 0:
        for p in paths:
            p.chmod(0o555 if p.is_dir() else 0o444)
        undo = [lambda p=p: p.chmod(0o755) for p in paths]
    else:
        chattr = shutil.which("chattr")
        if not chattr or subprocess.run([chattr, "+i", *map(str, paths)], capture_output=True).returncode:
            pytest.skip("running as root and chattr +i is not available here: cannot make a read-only store")
        undo = [lambda: subprocess.run([chattr, "-i", *map(str, paths)], check=True)]
    try:
        yield store, uri
    finally:
        for fn in undo:
            fn()


def test_a_read_only_tracking_store_is_refused_before_any_work(read_only_store, tiny, tmp_path):
    store, uri = read_only_store
    env = {"MLFLOW_TRACKING_URI": uri}
    line = _one_error_line(_m2snet("promote", "M", "1", "--force", cwd=tmp_path, env=env))
    assert line.startswith(f"error: {store / 'mlflow.db'}: ") and "read-only" in line
    line = _one_error_line(_m2snet(*_train_args(tiny, tmp_path / "run"), cwd=tmp_path, env=env))
    assert line.startswith(f"error: {store / 'mlflow.db'}: ") and "read-only" in line and "--no-track" in line
    assert not (tmp_path / "run" / "model.pt").exists()  # refused before training, not after
    # Reading a read-only store stays possible (a shared archive of results).
    proc = _m2snet("compare", "nowhere-run-id-a", "nowhere-run-id-b", "--no-track", cwd=tmp_path, env=env)
    assert proc.returncode == 2 and "read-only" not in proc.stderr and "Traceback" not in proc.stderr


def test_a_postgresql_tracking_uri_without_its_driver_names_the_package(tmp_path):
    """A bare postgresql:// is psycopg 3 to SQLAlchemy 2.1, which this package does not install (it installs
    psycopg2): MLflow's ModuleNotFoundError traceback becomes one line saying what to install or write."""
    import importlib.util

    if importlib.util.find_spec("psycopg") is not None:
        pytest.skip("psycopg 3 is installed here: a bare postgresql:// has its driver")
    env = {"MLFLOW_TRACKING_URI": "postgresql://alice:pw@127.0.0.1:5432/test"}
    line = _one_error_line(_m2snet("promote", "M", "1", cwd=tmp_path, env=env))
    assert line == ("error: tracking URI 'postgresql://alice:***@127.0.0.1:5432/test' (--tracking-uri or "
                    "$MLFLOW_TRACKING_URI): its database driver psycopg is not installed (pip install "
                    "'psycopg[binary]'; or name the installed psycopg2: postgresql+psycopg2://...)")


def test_a_scoped_tracking_uri_leaves_the_environment_in_charge(monkeypatch):
    """Logging a model or registering a protocol's version points MLflow at a URI for the block; afterwards the
    environment decides again (restoring ``get_tracking_uri()``'s answer pinned it for the rest of the process,
    and a later caller's $MLFLOW_TRACKING_URI was ignored: a promote went to another test's store)."""
    import mlflow

    from m2snet.mlops.mlflow_store import tracking_uri_scope

    mlflow.set_tracking_uri(None)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///a.db")
    with tracking_uri_scope("sqlite:///b.db"):
        assert mlflow.get_tracking_uri() == "sqlite:///b.db"
    assert mlflow.get_tracking_uri() == "sqlite:///a.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///c.db")
    assert mlflow.get_tracking_uri() == "sqlite:///c.db"  # not pinned
    mlflow.set_tracking_uri("sqlite:///explicit.db")  # an explicit choice survives the scope
    try:
        with tracking_uri_scope("sqlite:///b.db"):
            pass
        assert mlflow.get_tracking_uri() == "sqlite:///explicit.db"
    finally:
        mlflow.set_tracking_uri(None)
