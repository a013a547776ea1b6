"""Parallel ``m2snet cv`` workers sharing one ``--out`` (bench/busi_cpu_cv.sh: ``--folds 0,2`` in one process,
``--folds 1,3`` in another): the CV-level report covers every completed task of the same CV whichever worker
finished last, and two processes on the same task cannot race.

Concurrency is exercised with real processes (subprocess), never threads or mocks.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import make_tiny_dataset

REPO_ROOT = Path(__file__).resolve().parents[1]
# The tiniest CV the suite trains (12 demo cases at 64 px would be the pipeline's; 6 here), untracked.
SETTINGS = ["--preset", "tiny", "--device", "cpu", "--no-track", "--no-log-model"]

# A worker that imports everything first, then waits until another worker's task directory exists (that worker
# holds the task's lock: old code had none, and trained there all the same), then runs `m2snet` with argv[2:].
# Without the wait the second worker could reach the task after the first had finished it.
CV_AFTER = r"""
import sys, time
from pathlib import Path
import m2snet.cli, m2snet.workflows.cv  # torch and the rest: imported before the wait
started, deadline = Path(sys.argv[1]), time.time() + 120
while not started.exists() and time.time() < deadline:
    time.sleep(0.01)
sys.argv = ["m2snet", *sys.argv[2:]]
m2snet.cli.main()
"""


@pytest.fixture(scope="module")
def tiny_cv(tmp_path_factory) -> tuple[Path, Path]:
    """6 demo cases at 64 px in 2 folds: the dataset and its split file."""
    return make_tiny_dataset(tmp_path_factory.mktemp("parallel-cv"), n_per_class=(2, 2, 2))


def _cv_args(tiny_cv: tuple[Path, Path], out: Path, folds: str) -> list[str]:
    data, split = tiny_cv
    return ["cv", "--data", str(data), "--split", str(split), "--folds", folds, "--out", str(out), *SETTINGS]


def _start(args: list[str], after: Path | None = None) -> subprocess.Popen:
    """The real CLI in a child process, one torch thread (two workers share the 2 cores, as in the bench)."""
    head = ["-m", "m2snet.cli"] if after is None else ["-c", CV_AFTER, str(after)]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, *head, *args], env=env, cwd=REPO_ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _finish(*procs: subprocess.Popen) -> list[tuple[int, str]]:
    """Each one's exit code and stderr, once all have exited."""
    return [(p.returncode, err) for p in procs for _, err in [p.communicate(timeout=300)]]


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# About 20 s on 2 busy cores: one 1-epoch fold, and a worker that stops at once.
def test_two_workers_on_the_same_fold_one_fails_with_the_lock_error(tiny_cv, tmp_path):
    out = tmp_path / "cv"
    first = _start(_cv_args(tiny_cv, out, "0"))
    second = _start(_cv_args(tiny_cv, out, "0"), after=out / "fold0")
    (rc1, err1), (rc2, err2) = _finish(first, second)
    assert rc1 == 0, err1
    lines = [line for line in err2.splitlines() if line.startswith("error: ")]
    assert rc2 == 2 and len(lines) == 1, err2
    assert f"{out / 'fold0'}: another m2snet process (pid {first.pid} " in lines[0], lines[0]
    assert "Traceback" not in err2
    assert json.loads((out / "cv_summary.json").read_text())["folds"] == [0]


def test_the_cv_key_names_the_cv_not_the_worker(tmp_path):
    from m2snet.data.split import load_split
    from m2snet.training.config import TrainConfig
    from m2snet.workflows.cv import cv_key
    from m2snet.workflows.folds import FoldOptions, ScoreOptions
    from m2snet.workflows.tuning import TuningConfig

    data, split_file = make_tiny_dataset(tmp_path)
    split = load_split(split_file)
    cfg = TrainConfig(data=str(data), split=str(split_file), epochs=1)
    key = cv_key(cfg, split, [], FoldOptions())
    # What two workers of one CV may differ in: where and how fast they run, how the data path is spelled.
    worker = cfg.override(out_dir="elsewhere", fold=1, progress=False, num_workers=2, device="cpu", cache=False,
                          data=os.path.relpath(data), split=os.path.relpath(split_file))
    assert cv_key(worker, split, [], FoldOptions(resume=True, log_model=False)) == key
    tuned = FoldOptions(tuning=TuningConfig(n_trials=2))
    assert cv_key(cfg, split, [], FoldOptions(tuning=TuningConfig(n_trials=2, storage="journal:x"))) == \
        cv_key(cfg, split, [], tuned)
    # What makes another CV.
    others = [cv_key(cfg.override(epochs=2), split, [], FoldOptions()), cv_key(cfg, split, [42, 43], FoldOptions()),
              cv_key(cfg, split, [], FoldOptions(score=ScoreOptions(protocol="reference"))),
              cv_key(cfg, split, [], tuned),
              cv_key(cfg, split, [], FoldOptions(tuning=TuningConfig(n_trials=2), explicit=frozenset({"head_lr"})))]
    assert len({key, *others}) == 1 + len(others)
