"""DVC: the project's data.dvc matches a regenerated demo; push/pull through a real SeaweedFS S3.

Everything DVC writes happens in a temporary git+dvc repository: the project's own .dvc cache
is never touched.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from m2snet.data.demo import build_demo_dataset
from m2snet.data.versioning import dataset_version, tracked_version

REPO_ROOT = Path(__file__).resolve().parents[1]


def _run(cmd: list[str], cwd: Path, env: dict[str, str] | None = None) -> str:
    dvc = shutil.which("dvc") or str(Path(os.sys.executable).with_name("dvc"))
    argv = [dvc, *cmd[1:]] if cmd[0] == "dvc" else cmd
    proc = subprocess.run(argv, cwd=cwd, env={**os.environ, **(env or {})}, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


@pytest.fixture(scope="module")
def demo_copy(tmp_path_factory) -> Path:
    """data/demo regenerated exactly as a fresh clone would, in a temporary repo."""
    repo = tmp_path_factory.mktemp("repo")
    build_demo_dataset(repo / "data" / "demo")
    return repo


def test_project_data_dvc_matches_a_regenerated_demo(demo_copy):
    spec = yaml.safe_load((REPO_ROOT / "data.dvc").read_text())
    out = spec["outs"][0]
    assert out["path"] == "data/demo" and out["hash"] == "md5"
    assert dataset_version(demo_copy / "data" / "demo") == out["md5"]
    assert out["nfiles"] == sum(1 for p in (demo_copy / "data" / "demo").rglob("*") if p.is_file())
    # The project's remote has no endpoint or credentials in it: those come from the environment.
    config = (REPO_ROOT / ".dvc" / "config").read_text()
    assert "s3://" in config and "access_key" not in config and "secret" not in config and "endpointurl" not in config


def test_dvc_add_agrees_and_push_pull_round_trip_through_seaweedfs(demo_copy, s3_server, tmp_path):
    repo = demo_copy
    _run(["git", "init", "-q"], repo)
    _run(["dvc", "init", "-q"], repo)
    shutil.copy(REPO_ROOT / ".dvc" / "config", repo / ".dvc" / "config")  # the project's remote, as committed
    _run(["dvc", "add", "-q", "data/demo"], repo)
    recorded = yaml.safe_load((repo / "data" / "demo.dvc").read_text())["outs"][0]["md5"]
    assert recorded == dataset_version(repo / "data" / "demo")  # our hash == DVC's hash
    assert tracked_version(repo / "data" / "demo") == recorded

    env = s3_server.env()
    # Without credentials the S3 server refuses (the identity config is enforced).
    denied = subprocess.run(
        [shutil.which("dvc") or "dvc", "push", "-q"], cwd=repo, capture_output=True, text=True, timeout=180,
        env={**os.environ, "AWS_ENDPOINT_URL": env["AWS_ENDPOINT_URL"], "AWS_ACCESS_KEY_ID": "nobody",
             "AWS_SECRET_ACCESS_KEY": "wrong", "AWS_DEFAULT_REGION": "us-east-1"},
    )
    assert denied.returncode != 0
    _run(["dvc", "push", "-q"], repo, env)
    listing = s3_server.client().list_objects_v2(Bucket=s3_server.bucket, Prefix="dvc/")
    keys = [o["Key"] for o in listing.get("Contents", [])]
    assert any(k.endswith(".dir") for k in keys) and len(keys) >= 50

    shutil.rmtree(repo / ".dvc" / "cache")
    shutil.rmtree(repo / "data" / "demo")
    _run(["dvc", "pull", "-q"], repo, env)
    assert dataset_version(repo / "data" / "demo") == recorded
    assert "up to date" in _run(["dvc", "status"], repo, env)


def test_version_command_reports_dvc_agreement(demo_copy, tmp_path):
    import json

    from m2snet.cli import app

    target = tmp_path / "data" / "demo"
    shutil.copytree(demo_copy / "data" / "demo", target)
    shutil.copy(REPO_ROOT / "data.dvc", tmp_path / "data.dvc")
    (tmp_path / ".git").mkdir()  # marks the repository root for the .dvc file search
    result = CliRunner().invoke(app, ["data", "version", str(target), "--json"])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload["matches"] is True and payload["dvc_file"].endswith("data.dvc")
    (target / "manifest.csv").write_text((target / "manifest.csv").read_text() + "\n")
    payload = json.loads(CliRunner().invoke(app, ["data", "version", str(target), "--json"]).stdout)
    assert payload["matches"] is False and payload["version"] != payload["tracked"]
