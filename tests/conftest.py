"""Shared test fixtures.

Service fixtures (SeaweedFS S3, mlflow server, PostgreSQL) live in tests/fixtures/services.py and
are loaded as a plugin so every test module can ask for them by name.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

pytest_plugins = ["tests.fixtures.services", "tests.fixtures.container"]

REPO_ROOT = Path(__file__).resolve().parents[1]
# The real BUSI set sits beside the checkout (../shared/data/busi); a user's clone has none.
BUSI_ROOT = Path(os.environ.get("M2SNET_BUSI_ROOT", REPO_ROOT.parent / "shared" / "data" / "busi"))

# Keep tests on few threads: CI has two cores and several tests start subprocesses.
os.environ.setdefault("OMP_NUM_THREADS", "2")
# Tests never reach the network (no hub downloads of pretrained weights).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("M2SNET_OFFLINE", "1")
# Tests call console scripts (dvc, mlflow) by name: use this interpreter's, activated or not.
os.environ["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
# Never let a test write to a user's default MLflow store.
os.environ.pop("MLFLOW_TRACKING_URI", None)


@pytest.fixture(scope="session", autouse=True)
def _private_m2snet_cache(tmp_path_factory):
    """Caches (preprocessed arrays, downloaded models) go to the session's temporary directory, never
    to the user's ~/.cache/m2snet, and are removed with it."""
    mp = pytest.MonkeyPatch()
    mp.setenv("M2SNET_CACHE_DIR", str(tmp_path_factory.mktemp("m2snet-cache")))
    yield
    mp.undo()


@pytest.fixture(scope="module", autouse=True)
def _no_mlflow_experiment_across_modules():
    """A test picks its MLflow experiment through MLflow's public variables (``MLFLOW_EXPERIMENT_ID`` /
    ``MLFLOW_EXPERIMENT_NAME``, set with monkeypatch), never with ``mlflow.set_experiment``, which is
    process-wide: a later module's ``start_run`` would look for an experiment id its fresh store lacks
    ("No Experiment with id=1 exists"). Whatever a module leaves in those variables is cleared after it."""
    yield
    for name in ("MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME"):
        os.environ.pop(name, None)


@pytest.fixture(scope="session")
def busi_root() -> Path:
    if not (BUSI_ROOT / "benign").is_dir():
        pytest.skip(f"real BUSI data not found at {BUSI_ROOT} (set M2SNET_BUSI_ROOT to run this test)")
    return BUSI_ROOT


def make_tiny_dataset(base: Path, n_per_class=(2, 2, 2), size: int = 64, n_folds: int = 2,
                      seed: int = 0) -> tuple[Path, Path]:
    """A demo dataset in the m2snet layout under ``base/ds`` with a K-fold split ``base/split.json``."""
    from m2snet.data.demo import make_demo_dataset
    from m2snet.data.importers import import_dataset
    from m2snet.data.split import make_split

    make_demo_dataset(base / "raw", n_per_class=n_per_class, size=size, seed=seed)
    import_dataset("busi", base / "raw", base / "ds", progress=False)
    make_split(base / "ds", n_folds=n_folds, seed=0, out=base / "split.json")
    return base / "ds", base / "split.json"
