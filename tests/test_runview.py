"""The local run's console (m2snet.kubeflow.runview) on the real kfp local runner, with tiny components.

What the console shows comes from the tasks' progress events (m2snet.progress) and the pipeline's own
spec: no kfp function is replaced, and no log line is parsed.
"""

# No `from __future__ import annotations`: kfp reads the components' real parameter types.

import io
import sys

import pytest
from kfp import dsl, local

from m2snet import progress
from m2snet.kubeflow.runview import RunView, planned_tasks


@dsl.component(base_image="python:3.11", install_kfp_package=False)
def chatty_step(fold: int) -> int:
    import logging
    import warnings

    from m2snet import progress
    from m2snet.models.pretrained import _warn_random_init

    progress.task_started("chatty-step")
    _warn_random_init("encoder x: pretrained=False, using random weights")  # the models layer's note
    warnings.warn("a library notice nobody asked about", FutureWarning, stacklevel=1)
    for epoch, dice in ((1, 0.25), (2, 0.75)):
        logging.getLogger("m2snet.training").info("whatever the trainer's wording is today")
        progress.emit("epoch", epoch=epoch, epochs=2, loss=1 - dice, val_dice=dice)
    print("{\"executorInput\": \"noise\"}")
    return fold


@dsl.component(base_image="python:3.11", install_kfp_package=False)
def looped_step(fold: int) -> int:
    from m2snet import progress

    progress.task_started("looped-step", fold)
    progress.emit("evaluated", cases=3, dice=0.5 + fold / 10)
    return fold


@dsl.component(base_image="python:3.11", install_kfp_package=False)
def extra_step(value: int) -> int:
    from m2snet import progress

    progress.task_started("extra-step")
    return value + 1


@dsl.component(base_image="python:3.11", install_kfp_package=False)
def failing_step(value: int):
    from m2snet import progress

    progress.task_started("failing-step")
    raise ValueError(f"corrupt input {value}")


@dsl.pipeline(name="runview-ok")
def ok_pipeline() -> int:
    return chatty_step(fold=1).output


@dsl.pipeline(name="runview-loop")
def loop_pipeline() -> int:
    first = chatty_step(fold=0).set_display_name("chat")
    with dsl.ParallelFor([0, 1]) as fold:
        looped_step(fold=fold).after(first).set_display_name("score fold")
    # The step this test adds: the console was not told about it.
    return extra_step(value=first.output).set_display_name("extra check").output


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


def test_the_plan_is_the_pipeline_specs_tasks_with_their_display_names():
    from m2snet.kubeflow.pipelines import busi_cv

    plan = planned_tasks(busi_cv.build_pipeline(cluster=False), loop_items=2)
    labels = [label for _, label in plan]
    assert labels == ["prepare + validate", "split", "tune fold (Optuna) 0", "train fold 0", "evaluate fold 0",
                      "tune fold (Optuna) 1", "train fold 1", "evaluate fold 1", "aggregate CV", "register",
                      "promote", "finalize"]
    keys = [key for key, _ in plan]
    assert keys[:5] == ["prepare-dataset", "split-dataset", "tune-hyperparameters-0", "train-fold-0",
                        "evaluate-fold-0"] and keys[-1] == "finalize-run"
    # The compiled cluster YAML gives the same plan: one source, the spec.
    import yaml

    compiled = next(yaml.safe_load_all(busi_cv.COMPILED.read_text()))
    assert planned_tasks(compiled, loop_items=2) == plan
    with pytest.raises(ValueError):
        RunView("x", plan, mode="loud")


def test_plain_console_and_task_logs(kfp_root):
    out = _Pipe()
    real_stdout = sys.stdout
    with RunView(kfp_root / "logs", planned_tasks(ok_pipeline), mode="auto", stream=out) as view:
        assert view.mode == "plain"
        ok_pipeline()
    assert sys.stdout is real_stdout and progress.ENV not in __import__("os").environ  # hooks undone
    text = out.getvalue()
    lines = text.splitlines()
    assert len(lines) == 3, text  # running, a note once, done: nothing of the runner's stream
    assert "chatty-step" in lines[0] and "running" in lines[0]
    assert lines[1] == "note: encoder x: pretrained=False, using random weights"
    assert "done in" in lines[2] and "last val Dice 0.750" in lines[2] and "log: chatty-step.log" in lines[2]
    log = (kfp_root / "logs" / "chatty-step.log").read_text()
    assert "executorInput" in log and "trainer's wording" in log and "FutureWarning" in log
    assert "KFP Executor" in log and progress.TASK_MARK not in log  # the marks route the stream, unlogged
    assert "\x1b[" not in log  # kfp's colour codes are stripped from the files
    task = view.tasks["chatty-step"]
    assert task.state == "done" and task.progress == "epoch 2/2 · val Dice 0.750"
    assert (kfp_root / "logs" / "pipeline.log").read_text().count("Running pipeline") == 1


def test_a_new_step_shows_up_without_editing_the_console(kfp_root):
    """The console lists what the spec says, loops expanded, with the display names: the extra step too."""
    out = _Pipe()
    plan = planned_tasks(loop_pipeline, loop_items=2)
    # Dependency order; independent tasks by name (the spec's maps have no order).
    assert [label for _, label in plan] == ["chat", "extra check", "score fold 0", "score fold 1"]
    with RunView(kfp_root / "logs", plan, mode="plain", stream=out) as view:
        loop_pipeline()
    assert [(t.label, t.state) for t in view.tasks.values()] == [
        ("chat", "done"), ("extra check", "done"), ("score fold 0", "done"), ("score fold 1", "done")]
    assert view.tasks["looped-step-1"].result == "Dice 0.600 on 3 cases"
    assert "extra check" in out.getvalue() and (kfp_root / "logs" / "extra-step.log").is_file()
    table = io.StringIO()
    from rich.console import Console

    Console(file=table, width=120).print(view.table())
    assert "extra check" in table.getvalue() and "score fold 1" in table.getvalue()


def test_failed_task_is_named_with_its_log(kfp_root):
    out = _Pipe()
    with RunView(kfp_root / "logs", planned_tasks(failing_pipeline), mode="plain", stream=out) as view:
        with pytest.raises(RuntimeError, match="failing-step"):
            failing_pipeline()
        view.mark_skipped()
    (failed,) = view.failed
    assert failed.key == "failing-step" and "FAILED after" in out.getvalue()
    assert failed.error == "ValueError: corrupt input 0"  # the task said so itself; no log is parsed
    assert failed.tail().startswith("Traceback") and "ValueError: corrupt input 0" in failed.tail()


def test_stream_mode_echoes_everything(kfp_root):
    out = _Pipe()
    real = sys.stdout
    sys.stdout = out  # stream mode echoes to the stdout it found
    try:
        with RunView(kfp_root / "logs", planned_tasks(ok_pipeline), mode="stream", stream=out):
            ok_pipeline()
    finally:
        sys.stdout = real
    assert "executorInput" in out.getvalue() and (kfp_root / "logs" / "chatty-step.log").is_file()
