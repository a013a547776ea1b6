"""The operator's view of a local pipeline run: one line per task on the console, one log file per task.

The kfp local runner prints every task's executor input/output JSON and its whole output stream to
stdout. :class:`RunView` takes that stream over for the duration of a run:

* every kfp task's output (the KFP executor stream, the step's own logging, tracebacks) goes to its
  own file, ``<log_dir>/<task>.log`` (``train-fold-2.log``, ...); whatever the runner prints
  between tasks goes to ``<log_dir>/pipeline.log``;
* the console shows one line per task: queued, running (with its epoch / trial progress), done in
  N s (with its score), failed. On a terminal it is a live ``rich`` table; otherwise (CI, a pipe)
  a plain line is printed when a task starts or ends, and at most every ``PLAIN_PROGRESS_EVERY_S``
  while it runs;
* warnings the user must know (training from random weights) are shown once; library notices stay
  in the logs;
* ``mode="stream"`` (``--verbose``) prints everything as the runner does, and still writes the logs.

How: the runner calls ``kfp.local.task_dispatcher.run_single_task_implementation`` once per task,
in the thread that streams that task's subprocess; the view wraps that function to learn which task
a thread runs, and replaces ``sys.stdout`` by a writer that sends each thread's text to its task's
log. Both are restored when the run ends.
"""

from __future__ import annotations

import logging
import re
import sys
import textwrap
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, TextIO

from rich.console import Console
from rich.live import Live
from rich.table import Table

# kfp component name (without "comp-") -> the label the console shows.
TASK_LABELS = {
    "prepare-dataset": "prepare + validate",
    "split-dataset": "split",
    "tune-hyperparameters": "tune fold {fold}",
    "train-fold": "train fold {fold}",
    "evaluate-fold": "evaluate fold {fold}",
    "aggregate-cv": "CV table",
    "register-model": "register",
    "promote-model": "promote",
    "finalize-run": "close MLflow run",
}
FOLD_COMPONENTS = ("tune-hyperparameters", "train-fold", "evaluate-fold")  # nested tuning: one study a fold
PLAIN_PROGRESS_EVERY_S = 60.0  # a non-terminal console gets a progress line at most this often per task
LOG_TAIL_LINES = 40

# What the console reads from a task's stream.
_EPOCH = re.compile(r"epoch (\d+)/(\d+): loss [-\d.naif]+(?: val_dice ([\d.]+))?")
_TRIAL_DONE = re.compile(r"Trial (\d+) (?:finished|pruned)")
_TUNE_START = re.compile(r"tuning: study .* has (\d+)/(\d+) finished trials")
_EVALUATED = re.compile(r"evaluated (\d+) cases: dice=([\d.]+)")
_CV = re.compile(r"^\|\s*CV\s*\|")
_RANDOM_INIT = re.compile(r"WARNING\]?:?\s*(.*(?:random weights|RANDOM weights).*)")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_PROMOTION = re.compile(r"version (\S+): (PROMOTED|not promoted) \((.*)\)")


@dataclass
class TaskState:
    key: str  # "train-fold-2": the log file's stem
    label: str  # "train fold 2"
    log: Path
    state: str = "queued"  # queued | running | done | failed | skipped
    started: float | None = None
    ended: float | None = None
    progress: str = ""  # "epoch 3/50 · val Dice 0.712"
    result: str = ""  # "Dice 0.795" once done
    last_plain: float = 0.0
    partial: str = ""  # an unfinished line of the stream
    trials: tuple[int, int] = (0, 0)  # tune: (finished, wanted)

    @property
    def seconds(self) -> float | None:
        if self.started is None:
            return None
        return (self.ended or time.monotonic()) - self.started

    def tail(self, n: int = LOG_TAIL_LINES) -> str:
        """The end of the task's log: from its last traceback on if it has one, at most ``n`` lines."""
        try:
            lines = self.log.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        starts = [i for i, line in enumerate(lines) if line.strip() == "Traceback (most recent call last):"]
        lines = lines[starts[-1]:] if starts else lines
        return textwrap.dedent("\n".join(lines[-n:])).strip()


def task_key(component_name: str, arguments: dict[str, Any]) -> str:
    """The view's key of a kfp task: the component's name, with the fold index for fold tasks."""
    name = component_name.removeprefix("comp-")
    if name in FOLD_COMPONENTS and "fold" in arguments:
        return f"{name}-{int(float(arguments['fold']))}"
    return name


def task_label(key: str) -> str:
    for name in FOLD_COMPONENTS:
        if key.startswith(name + "-"):
            return TASK_LABELS[name].format(fold=key[len(name) + 1:])
    return TASK_LABELS.get(key, key)


def planned_tasks(n_folds: int) -> list[str]:
    """The tasks of one pipeline run, in the order the console lists them."""
    folds = [f"{name}-{i}" for i in range(n_folds) for name in FOLD_COMPONENTS]
    return ["prepare-dataset", "split-dataset", *folds, "aggregate-cv", "register-model",
            "promote-model", "finalize-run"]


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return ""
    if seconds < 59.5:
        return f"{seconds:.0f} s" if seconds >= 10 else f"{seconds:.1f} s"
    whole = round(seconds)
    return f"{whole // 60} min {whole % 60:02d} s"


class _ThreadRouter:
    """A ``sys.stdout`` stand-in: each thread's text goes to the log of the task it runs."""

    def __init__(self, view: "RunView", echo: TextIO | None):
        self._view = view
        self._echo = echo  # the real stdout in stream mode

    def write(self, text: str) -> int:
        self._view._write(getattr(self._view._local, "task", None), text)
        if self._echo is not None:
            self._echo.write(text)
        return len(text)

    def flush(self) -> None:
        if self._echo is not None:
            self._echo.flush()

    def isatty(self) -> bool:
        return False

    @property
    def encoding(self) -> str:
        return "utf-8"


class RunView:
    """Console + per-task logs for one local pipeline run (a context manager around the run)."""

    def __init__(self, log_dir: str | Path, *, n_folds: int, n_trials: int = 0, mode: str = "auto",
                 stream: TextIO | None = None):
        if mode not in ("auto", "live", "plain", "stream"):
            raise ValueError(f"RunView mode {mode!r}: expected auto, live, plain or stream")
        self.stream = stream or sys.stdout
        if mode == "auto":
            mode = "live" if self.stream.isatty() else "plain"
        self.mode = mode
        self.log_dir = Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.main_log = self.log_dir / "pipeline.log"
        self.tasks: dict[str, TaskState] = {}
        for key in planned_tasks(n_folds):
            self._task(key)
        if n_trials > 0:
            for i in range(n_folds):
                self.tasks[f"tune-hyperparameters-{i}"].trials = (0, n_trials)
        self.notes: list[str] = []  # warnings shown once
        self.pipeline_run_id: str = ""  # the runner's job id (= dsl.PIPELINE_JOB_ID_PLACEHOLDER)
        self.cv_row: str = ""
        self.promotion: str = ""
        self.t0 = time.monotonic()
        self._lock = threading.RLock()
        self._local = threading.local()
        self._files: dict[str | None, TextIO] = {}
        self._live = None
        self._saved: list[Callable[[], None]] = []

    # --- tasks ---------------------------------------------------------------------------------
    def _task(self, key: str) -> TaskState:
        if key not in self.tasks:
            self.tasks[key] = TaskState(key, task_label(key), self.log_dir / f"{key}.log")
        return self.tasks[key]

    @property
    def failed(self) -> list[TaskState]:
        return [t for t in self.tasks.values() if t.state == "failed"]

    def task_started(self, key: str) -> None:
        with self._lock:
            task = self._task(key)
            task.state, task.started, task.ended, task.progress = "running", time.monotonic(), None, ""
            self._plain(task, "running")
            self._refresh()

    def task_finished(self, key: str, ok: bool) -> None:
        with self._lock:
            task = self._task(key)
            self._consume(task, task.partial + "\n") if task.partial else None
            task.partial = ""
            task.state, task.ended = ("done" if ok else "failed"), time.monotonic()
            f = self._files.pop(key, None)
            if f is not None:
                f.close()
            text = (f"done in {_duration(task.seconds)}" if ok else f"FAILED after {_duration(task.seconds)}")
            self._plain(task, text + (f"  {task.result}" if ok and task.result else "")
                        + f"  log: {task.log.name}")
            self._refresh()

    def mark_skipped(self) -> None:
        """Tasks that never started because an upstream one failed."""
        with self._lock:
            for task in self.tasks.values():
                if task.state == "queued":
                    task.state = "skipped"
            self._refresh()

    # --- the stream ----------------------------------------------------------------------------
    def _write(self, key: str | None, text: str) -> None:
        with self._lock:
            f = self._files.get(key)
            if f is None:
                path = self.tasks[key].log if key in self.tasks else self.main_log
                f = self._files[key] = open(path, "a", encoding="utf-8", errors="replace")
            f.write(_ANSI.sub("", text))  # kfp colours its task names; a log file wants plain text
            f.flush()
            if key in self.tasks:
                task = self.tasks[key]
                lines = (task.partial + text).split("\n")
                task.partial = lines.pop()
                for line in lines:
                    self._consume(task, line)

    def _consume(self, task: TaskState, line: str) -> None:
        """Read progress, scores and user-relevant warnings off one line of a task's stream."""
        if (m := _EPOCH.search(line)) is not None:
            epoch = f"epoch {m[1]}/{m[2]}" + (f" · val Dice {float(m[3]):.3f}" if m[3] else "")
            if task.trials[1]:
                done, wanted = task.trials
                task.progress = f"trial {min(done + 1, wanted)}/{wanted} · {epoch}"
            else:
                task.progress = epoch
            self._refresh()
            if task.started is not None and time.monotonic() - task.last_plain >= PLAIN_PROGRESS_EVERY_S:
                self._plain(task, task.progress)
        elif (m := _TUNE_START.search(line)) is not None:
            task.trials = (int(m[1]), int(m[2]))
        elif (m := _TRIAL_DONE.search(line)) is not None and task.trials[1]:
            task.trials = (task.trials[0] + 1, task.trials[1])
            task.progress = f"trial {task.trials[0]}/{task.trials[1]} finished"
            self._refresh()
        elif (m := _EVALUATED.search(line)) is not None:
            task.result = f"Dice {float(m[2]):.3f} on {m[1]} cases"
        elif (m := _RANDOM_INIT.search(line)) is not None:
            self._note(m[1].strip())
        elif (m := _PROMOTION.search(line)) is not None:
            self.promotion = m[3]
        elif _CV.match(line.strip()):
            self.cv_row = line.strip()
        if task.key.startswith("train-fold") and (m := _EPOCH.search(line)) is not None and m[3]:
            task.result = f"last val Dice {float(m[3]):.3f}"

    def _note(self, message: str) -> None:
        if message in self.notes:
            return
        self.notes.append(message)
        if self.mode == "plain":
            self._print(f"note: {message}")
        elif self.mode == "live" and self._live is not None:
            self._live.console.print(f"[yellow]note:[/] {message}", highlight=False)

    # --- rendering -----------------------------------------------------------------------------
    def header(self, text: str) -> None:
        """Lines shown once above the task lines (what runs, where its logs go)."""
        if self.mode == "live" and self._live is not None:
            self._live.console.print(text, highlight=False)
        else:
            self._print(text)

    def _print(self, text: str) -> None:
        self.stream.write(text + "\n")
        self.stream.flush()

    def _plain(self, task: TaskState, text: str) -> None:
        if self.mode != "plain":
            return
        task.last_plain = time.monotonic()
        self._print(f"[{_duration(time.monotonic() - self.t0):>10}] {task.label:<20} {text}")

    def _refresh(self) -> None:
        if self._live is not None:
            self._live.update(self.table(), refresh=False)

    def table(self):
        """The task table (a ``rich`` renderable)."""
        with self._lock:
            return self._table()

    def _table(self):
        styles = {"queued": "dim", "running": "bold cyan", "done": "green", "failed": "bold red", "skipped": "dim"}
        marks = {"queued": "·", "running": "▶", "done": "✓", "failed": "✗", "skipped": "-"}
        table = Table(box=None, pad_edge=False, show_header=True, header_style="bold")
        table.add_column("", no_wrap=True)
        table.add_column("task", no_wrap=True, min_width=18)
        table.add_column("time", no_wrap=True, justify="right", min_width=9)
        table.add_column("status", no_wrap=True, overflow="ellipsis", ratio=3)
        table.add_column("log", no_wrap=True, overflow="ellipsis", ratio=2)
        for task in self.tasks.values():
            status = {"running": task.progress or "running", "done": task.result or "done",
                      "failed": "FAILED"}.get(task.state, task.state)
            table.add_row(marks[task.state], task.label, _duration(task.seconds), status,
                          task.log.name if task.state not in ("queued", "skipped") else "",
                          style=styles[task.state])
        return table

    # --- hooks ---------------------------------------------------------------------------------
    def __enter__(self) -> "RunView":
        from kfp.local import status as kfp_status
        from kfp.local import task_dispatcher

        original = task_dispatcher.run_single_task_implementation
        view = self

        def run_task(*args: Any, **kwargs: Any):
            key = task_key(kwargs["component_name"], kwargs.get("arguments") or {})
            view.pipeline_run_id = view.pipeline_run_id or kwargs.get("unique_pipeline_id", "")
            view.task_started(key)
            view._local.task = key
            ok = False
            try:
                outputs, task_status = original(*args, **kwargs)
                ok = task_status == kfp_status.Status.SUCCESS
                return outputs, task_status
            finally:
                view._local.task = None
                view.task_finished(key, ok)

        task_dispatcher.run_single_task_implementation = run_task
        self._saved.append(lambda: setattr(task_dispatcher, "run_single_task_implementation", original))

        real_stdout, real_stderr = sys.stdout, sys.stderr
        router = _ThreadRouter(self, real_stdout if self.mode == "stream" else None)
        sys.stdout = router  # type: ignore[assignment]
        self._saved.append(lambda: setattr(sys, "stdout", real_stdout))
        if self.mode != "stream":
            # The parent process's own logging and warnings: into pipeline.log (or the task's log).
            sys.stderr = router  # type: ignore[assignment]
            self._saved.append(lambda: setattr(sys, "stderr", real_stderr))
            root = logging.getLogger()
            handlers = root.handlers[:]
            handler = logging.StreamHandler(router)
            handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
            root.handlers[:] = [handler]
            self._saved.append(lambda: root.handlers.__setitem__(slice(None), handlers))
            logging.captureWarnings(True)
            self._saved.append(lambda: logging.captureWarnings(False))
        if self.mode == "live":
            console = Console(file=self.stream, force_terminal=True)
            self._live = Live(self.table(), console=console, refresh_per_second=4, transient=False,
                              redirect_stdout=False, redirect_stderr=False, get_renderable=self.table)
            self._live.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._live is not None:
            self._live.update(self.table(), refresh=True)
            self._live.stop()
            self._live = None
        for restore in reversed(self._saved):
            restore()
        self._saved.clear()
        with self._lock:
            for f in self._files.values():
                f.close()
            self._files.clear()
