"""The local run's console (m2snet.kubeflow.runview) on the real kfp local runner, with two tiny components."""

# No `from __future__ import annotations`: kfp reads the components' real parameter types.

import io
import sys

import pytest
from kfp import dsl, local

from m2snet.kubeflow.runview import RunView, planned_tasks, task_key, task_label


@dsl.component(base_image="python:3.11", install_kfp_package=False)
def chatty_step(fold: int) -> int:
    import logging
    import warnings

    logging.getLogger("m2snet.models").warning("encoder x: pretrained=False, using random weights")
    warnings.warn("a library notice nobody asked about", FutureWarning, stacklevel=1)
    logging.getLogger("m2snet.training").warning("epoch 1/2: loss 0.9000 val_dice 0.2500 | 1 img/s | 1s")
    logging.getLogger("m2snet.training").warning("epoch 2/2: loss 0.5000 val_dice 0.7500 | 1 img/s | 1s")
    print("{\"executorInput\": \"noise\"}")
    return fold


@dsl.component(base_image="python:3.11", install_kfp_package=False)
def failing_step(value: int):
    raise ValueError(f"corrupt input {value}")


@dsl.pipeline(name="runview-ok")
def ok_pipeline() -> int:
    return chatty_step(fold=1).output


@dsl.pipeline(name="runview-fail")
def failing_pipeline():
    failing_step(value=chatty_step(fold=0).output)


class _Pipe(io.StringIO):
    def isatty(self) -> bool:
        return False


@pytest.fixture
def kfp_root(tmp_path):
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(tmp_path / "kfp"),
               raise_on_error=True)
    return tmp_path


def test_keys_labels_and_plan():
    assert task_key("comp-train-fold", {"fold": 2.0}) == "train-fold-2"
    assert task_key("comp-prepare-dataset", {"preset": "tiny"}) == "prepare-dataset"
    assert task_label("evaluate-fold-3") == "evaluate fold 3" and task_label("other") == "other"
    plan = planned_tasks(4)
    # Nested tuning: each fold's tune, train, evaluate.
    assert len(plan) == 2 + 12 + 4 and plan[2:5] == ["tune-hyperparameters-0", "train-fold-0", "evaluate-fold-0"]
    assert task_key("comp-tune-hyperparameters", {"fold": 1}) == "tune-hyperparameters-1"
    assert task_label("tune-hyperparameters-1") == "tune fold 1"
    with pytest.raises(ValueError):
        RunView("x", n_folds=1, mode="loud")


def test_plain_console_and_task_logs(kfp_root):
    out = _Pipe()
    real_stdout = sys.stdout
    with RunView(kfp_root / "logs", n_folds=0, mode="auto", stream=out) as view:
        assert view.mode == "plain"
        ok_pipeline()
    assert sys.stdout is real_stdout  # hooks undone
    text = out.getvalue()
    lines = text.splitlines()
    assert len(lines) == 3, text  # running, a note once, done: nothing of the runner's stream
    assert "chatty-step" in lines[0] and "running" in lines[0]
    assert lines[1] == "note: encoder x: pretrained=False, using random weights"
    assert "done in" in lines[2] and "log: chatty-step.log" in lines[2]
    log = (kfp_root / "logs" / "chatty-step.log").read_text()
    assert "executorInput" in log and "epoch 2/2" in log and "FutureWarning" in log
    assert "\x1b[" not in log  # kfp's colour codes are stripped from the files
    task = view.tasks["chatty-step"]
    assert task.state == "done" and task.progress == "epoch 2/2 · val Dice 0.750"
    assert (kfp_root / "logs" / "pipeline.log").read_text().count("Running pipeline") == 1


def test_failed_task_is_named_with_its_log(kfp_root):
    out = _Pipe()
    with RunView(kfp_root / "logs", n_folds=0, mode="plain", stream=out) as view:
        with pytest.raises(RuntimeError, match="failing-step"):
            failing_pipeline()
        view.mark_skipped()
    (failed,) = view.failed
    assert failed.key == "failing-step" and "FAILED after" in out.getvalue()
    assert failed.tail().startswith("Traceback") and "ValueError: corrupt input 0" in failed.tail()


def test_stream_mode_echoes_everything(kfp_root):
    out = _Pipe()
    real = sys.stdout
    sys.stdout = out  # stream mode echoes to the stdout it found
    try:
        with RunView(kfp_root / "logs", n_folds=0, mode="stream", stream=out):
            ok_pipeline()
    finally:
        sys.stdout = real
    assert "executorInput" in out.getvalue() and (kfp_root / "logs" / "chatty-step.log").is_file()
