"""The library's walls (docs/architecture.md, "Layers"): import-linter contracts and ruff, run for real.

The contracts live in pyproject.toml ([tool.importlinter]); these tests run `lint-imports` on the
package as it is, and on a copy with one deliberate violation per wall, which must fail naming it.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _tool(name: str) -> str:
    path = BIN / name
    if not path.is_file():
        found = shutil.which(name)
        if found is None:
            pytest.skip(f"{name} is not installed (pip install -e '.[dev]')")
        return found
    return str(path)


def _lint_imports(root: Path) -> subprocess.CompletedProcess:
    # --no-cache: the cache would be keyed on the real package's files, not the copy's.
    return subprocess.run([_tool("lint-imports"), "--no-cache", "--config", str(root / "pyproject.toml")],
                          cwd=root, env={"PYTHONPATH": str(root), "PATH": str(BIN)}, capture_output=True,
                          text=True, timeout=300)


def test_import_contracts_hold():
    proc = _lint_imports(ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "0 broken" in proc.stdout


@pytest.mark.parametrize(("module", "line", "broken"), [
    # A model reaching into the data layer (the checkpoint once took mean/std from data.dataset).
    ("m2snet/models/base.py", "import m2snet.data.format", "m2snet.models is not allowed to import m2snet.data"),
    # The trainer talking to MLflow itself instead of through a callback.
    ("m2snet/training/config.py", "import m2snet.mlops.tracking",
     "m2snet.training is not allowed to import m2snet.mlops"),
    # A workflow step importing the kfp DSL: only the Kubeflow side may.
    ("m2snet/workflows/steps.py", "import kfp.dsl", "m2snet.workflows is not allowed to import kfp"),
    # Two modules of one layer importing each other (cache and dataset once did).
    ("m2snet/data/cache.py", "import m2snet.data.dataset", "No cycles are allowed in m2snet.data"),
])
def test_a_broken_wall_fails_lint_imports(tmp_path, module, line, broken):
    copy = tmp_path / "repo"
    copy.mkdir()
    shutil.copy(ROOT / "pyproject.toml", copy / "pyproject.toml")
    shutil.copytree(ROOT / "m2snet", copy / "m2snet", ignore=shutil.ignore_patterns("__pycache__"))
    target = copy / module
    target.write_text(target.read_text() + f"\n{line}  # deliberate violation\n")
    proc = _lint_imports(copy)
    assert proc.returncode != 0, proc.stdout
    assert broken in " ".join(proc.stdout.split()), proc.stdout


def test_ruff_passes():
    proc = subprocess.run([_tool("ruff"), "check", "--no-cache", "."], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
