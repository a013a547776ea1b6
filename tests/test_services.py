"""The service helpers and fixtures against the real servers: SeaweedFS S3, mlflow server, PostgreSQL."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request

import pytest

from m2snet.mlops import services
from tests.fixtures import postgres


def _log_run_with_artifact(url: str, tmp_path) -> str:
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=url)
    exp = client.create_experiment(f"svc-test-{os.getpid()}-{time.time_ns()}")
    run = client.create_run(exp)
    client.log_metric(run.info.run_id, "dice", 0.5)
    path = tmp_path / "note.txt"
    path.write_text("artifact through the server")
    client.log_artifact(run.info.run_id, str(path))
    client.set_terminated(run.info.run_id)
    assert client.get_run(run.info.run_id).data.metrics["dice"] == 0.5
    return run.info.run_id


def test_s3_requires_the_session_credentials(s3_server):
    import boto3
    from botocore.exceptions import ClientError

    s3 = s3_server.client()
    s3.put_object(Bucket=s3_server.bucket, Key="probe/x.txt", Body=b"hello")
    assert s3.get_object(Bucket=s3_server.bucket, Key="probe/x.txt")["Body"].read() == b"hello"
    intruder = boto3.client("s3", endpoint_url=s3_server.endpoint_url, aws_access_key_id="nobody",
                            aws_secret_access_key="wrong", region_name="us-east-1")
    with pytest.raises(ClientError):
        intruder.get_object(Bucket=s3_server.bucket, Key="probe/x.txt")
    assert s3_server.endpoint_url.startswith("http://127.0.0.1:")
    assert set(s3_server.env()) >= {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "MLFLOW_S3_ENDPOINT_URL"}


def test_mlflow_server_stores_artifacts_in_the_bucket(mlflow_server, s3_server, tmp_path):
    run_id = _log_run_with_artifact(mlflow_server.url, tmp_path)
    # Every page: the session's server holds the whole suite's artifacts (over S3's 1000 keys a listing).
    pages = s3_server.client().get_paginator("list_objects_v2").paginate(Bucket=s3_server.bucket,
                                                                          Prefix="mlflow-sqlite/")
    keys = [o["Key"] for page in pages for o in page.get("Contents", [])]
    assert any(run_id in k and k.endswith("note.txt") for k in keys), keys[-20:]


@pytest.mark.slow  # a second mlflow server start (~35 s on 2 shared cores); the fixture is shared with other suites
def test_mlflow_server_on_postgres(mlflow_server_pg, s3_server, tmp_path):
    run_id = _log_run_with_artifact(mlflow_server_pg.url, tmp_path)
    assert mlflow_server_pg.backend_store_uri.startswith("postgresql+psycopg2://")
    pages = s3_server.client().get_paginator("list_objects_v2").paginate(Bucket=s3_server.bucket, Prefix="mlflow-pg/")
    keys = [o["Key"] for page in pages for o in page.get("Contents", [])]
    assert any(run_id in k for k in keys)


def test_pg_database_is_fresh_and_dropped(pg_database):
    import psycopg2

    assert pg_database.startswith("postgresql+psycopg2://")
    conn = psycopg2.connect(pg_database.replace("+psycopg2", ""))
    with conn.cursor() as cur:
        cur.execute("SELECT count(*) FROM information_schema.tables WHERE table_schema = 'public'")
        assert cur.fetchone()[0] == 0
        cur.execute("CREATE TABLE t (x int)")
    conn.commit()
    conn.close()
    name = pg_database.rsplit("/", 1)[1]
    pytest.current_pg_name = name  # checked (dropped) by the next test


def test_previous_pg_database_was_dropped():
    name = getattr(pytest, "current_pg_name", None)
    if name is None or postgres.postgres_available() is not None:
        pytest.skip("needs test_pg_database_is_fresh_and_dropped to have run")
    import psycopg2

    conn = psycopg2.connect(host="127.0.0.1", user="postgres", dbname="postgres")
    with conn.cursor() as cur:
        cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
        assert cur.fetchone() is None
    conn.close()


def test_start_failure_names_the_log(tmp_path):
    with pytest.raises(services.M2SNetError, match=r"mlflow exited with code .* log .*mlflow-"):
        services.start_mlflow_server("notadb://x", str(tmp_path / "art"), workdir=tmp_path, timeout=60)


@pytest.mark.slow
def test_services_up_prints_exports_and_stops_on_ctrl_c(tmp_path):
    """`m2snet services up` end to end (slow: starts SeaweedFS and mlflow, ~40 s on 2 cores)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "m2snet.cli", "services", "up", "--dir", str(tmp_path / "svc")],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )
    exports = {}
    try:
        deadline = time.monotonic() + 180
        for line in proc.stdout:
            if line.startswith("export "):
                key, value = line[len("export "):].strip().split("=", 1)
                exports[key] = value
            if "Ctrl-C stops both" in line or time.monotonic() > deadline:
                break
        expected = {"MLFLOW_TRACKING_URI", "MLFLOW_S3_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
        assert expected <= set(exports)
        with urllib.request.urlopen(exports["MLFLOW_TRACKING_URI"] + "/health", timeout=5) as resp:
            assert resp.status == 200
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(60)
    assert proc.returncode == 0
