"""Parallel ``m2snet cv`` workers sharing one ``--out`` (bench/busi_cpu_cv.sh: ``--folds 0,2`` in one process,
``--folds 1,3`` in another): the CV-level report covers every completed task of the same CV whichever worker
finished last, and two processes on the same task cannot race.

Concurrency is exercised with real processes (subprocess), never threads or mocks.
"""

from __future__ import annotations

import csv
import json
import logging
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


# 25-50 s on 2 cores, by what else runs there: two 1-epoch folds at once.
def test_two_workers_on_different_folds_leave_the_report_of_all_folds(tiny_cv, tmp_path):
    from m2snet.workflows.cv_summary import summarize_cv

    out = tmp_path / "cv"
    done = _finish(_start(_cv_args(tiny_cv, out, "0")), _start(_cv_args(tiny_cv, out, "1")))
    assert [rc for rc, _ in done] == [0, 0], "\n".join(err for _, err in done)

    # Whichever finished last wrote the report of both folds: what the folds themselves recorded.
    results = [json.loads((out / f"fold{k}" / "fold_result.json").read_text()) for k in (0, 1)]
    summary = json.loads((out / "cv_summary.json").read_text())
    assert summary["folds"] == [0, 1] and summary["n_folds"] == 2
    expected = summarize_cv([r["metrics"] for r in results], [0, 1])
    assert summary["mean_percent"] == pytest.approx(expected.mean, nan_ok=True)
    assert summary["std_percent"] == pytest.approx(expected.std, nan_ok=True)
    for row, result in zip(summary["per_fold"], results):
        assert row["fold"] == result["fold"] and row["dice"] == pytest.approx(result["metrics"]["dice"])
    assert "| 2 folds, " in (out / "cv_table.md").read_text()
    per_case = _rows(out / "cv_per_case.csv")
    for k in (0, 1):  # every case each fold scored, with its scores
        fold_rows = _rows(out / f"fold{k}" / "eval" / "per_case.csv")
        assert [{c: r[c] for c in fold_rows[0]} for r in per_case if r["fold"] == str(k)] == fold_rows
    assert json.loads((out / "cv_lineage.json").read_text())["folds"] == [0, 1]
    assert any("ran in another process" in err for _, err in done), "\n".join(err for _, err in done)
    assert not list(out.rglob(".*.lock"))  # no lock left behind


# 20-35 s on 2 cores: one 1-epoch fold, and a worker that stops at once.
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


def _task(fold_dir: Path, fold: int, key: str | None, dice: float = 0.5, seed: int = 42) -> Path:
    """A completed task's directory as run_fold leaves it (the files the CV report reads)."""
    (fold_dir / "eval").mkdir(parents=True)
    (fold_dir / "fold_result.json").write_text(json.dumps(
        {"fold": fold, "seed": seed, "metrics": {"dice": dice, "n_cases": 1}, "run_id": f"run{fold}",
         **({"cv_key": key} if key is not None else {})}))
    (fold_dir / "eval" / "fold.json").write_text(json.dumps(
        {"fold": fold, "seed": seed, "data_version": "v1", "split_sha256": "s1"}))
    (fold_dir / "eval" / "per_case.csv").write_text(f"case_id,label,dice\ncase{fold},benign,{dice}\n")
    (fold_dir / "history.json").write_text(json.dumps([{"epoch": 1, "train_loss": 1.0}]))
    return fold_dir


def test_the_report_merges_only_tasks_of_the_same_cv(tmp_path, caplog):
    from m2snet.workflows.cv import other_tasks

    out = tmp_path / "cv"
    ran = _task(out / "fold0", 0, "this")  # this process's: its own result, not read back
    _task(out / "fold1", 1, "this", dice=0.7)
    _task(out / "fold2", 2, "another")  # same folder, another CV (e.g. other settings)
    _task(out / "fold3", 3, None)  # an older run: no key recorded
    (out / "fold4").mkdir()  # not finished: another worker's, in progress
    (out / "fold1-tune").mkdir()  # a tuning study's folder, no task
    _task(out / "seed43" / "fold0", 0, "this", seed=43)
    with caplog.at_level(logging.INFO, logger="m2snet.workflows.cv"):
        found = other_tasks(out, "this", ran=[ran])
    assert [(t.fold_dir, t.fold, t.seed, t.metrics["dice"], t.here) for t in found] == \
        [(out / "fold1", 1, 42, 0.7, False), (out / "seed43" / "fold0", 0, 43, 0.5, False)]
    assert found[0].history == [{"epoch": 1, "train_loss": 1.0}] and found[0].run_id == "run1"
    (skipped,) = [r.getMessage() for r in caplog.records if "leaves out" in r.getMessage()]
    assert skipped.endswith("fold2 (another CV), fold3 (no cv_key: an older run)"), skipped


def test_the_parent_run_names_the_tasks_another_process_ran(tmp_path, monkeypatch, caplog):
    """The report of a worker that ran fold 1 while fold 0 (and another CV's fold 2) finished elsewhere: both
    folds of its CV by fold, one log line and a tag on its parent run saying which ran elsewhere."""
    from mlflow import MlflowClient

    from m2snet.mlops.mlflow_store import TrackingConfig
    from m2snet.mlops.tracking import Tracker
    from m2snet.workflows.cv import report_cv_tasks
    from m2snet.workflows.folds import FoldResult

    monkeypatch.chdir(tmp_path)  # MLflow's artifacts (./mlruns) beside the store
    out = tmp_path / "cv"
    _task(out / "fold0", 0, "this", dice=0.25)
    mine = _task(out / "fold1", 1, "this", dice=0.75)
    _task(out / "fold2", 2, "another")
    result = FoldResult(fold=1, metrics={"dice": 0.75, "n_cases": 1}, out_dir=mine, checkpoint=mine / "model.pt",
                        selected_epoch=1, history=[{"epoch": 1}], run_id="mine", seed=42)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with caplog.at_level(logging.INFO, logger="m2snet.workflows.cv"), \
            Tracker.start(TrackingConfig(uri=uri, experiment="report"), run_name="cv-m") as parent:
        summary = report_cv_tasks([result], out, "this", title="m", parent=parent)
    assert summary.folds == [0, 1] and summary.mean["dice"] == pytest.approx(50.0)
    assert [r["fold"] for r in json.loads((out / "cv_summary.json").read_text())["per_fold"]] == [0, 1]
    assert [r["case_id"] for r in _rows(out / "cv_per_case.csv")] == ["case0", "case1"]
    assert "the report covers folds 0,1; fold 0 ran in another process" in caplog.messages
    tag = MlflowClient(uri).get_run(parent.run_id).data.tags["m2snet.cv_report_tasks"]
    assert json.loads(tag) == [{"fold": 0, "seed": 42, "run_id": "run0", "here": False},
                               {"fold": 1, "seed": 42, "run_id": "mine", "here": True}]
    assert not list(out.glob(".*.lock"))


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
