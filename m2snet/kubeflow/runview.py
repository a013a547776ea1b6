"""The operator's view of a local pipeline run: one line per task on the console, one log file per task.

The kfp local runner prints every task's executor input/output JSON and its whole output stream to
stdout. :class:`RunView` takes that stream over for the duration of a run:

* the task list and its labels come from the pipeline's own spec (:func:`planned_tasks`: its tasks
  in dependency order, display names as labels, a loop's tasks once per item), so a new step is
  listed without editing this module;
* what each task is doing comes from its progress events (:mod:`m2snet.progress`): the view points
  ``$M2SNET_PROGRESS_FILE`` at ``<log_dir>/events.jsonl`` for the run and tails it (task start and
  end, epochs, trials, evaluation scores, promotion, notes) -- data, not log wording;
* every task's output (its own logging, the KFP executor's, tracebacks) goes to its own file,
  ``<log_dir>/<task>.log`` (``train-fold-2.log``, ...): a task process marks the start and end of
  its stream (:data:`m2snet.progress.TASK_MARK`), and the runner thread that prints that stream
  sends it to that task's file; whatever the runner prints outside a task goes to ``pipeline.log``;
* the console shows one line per task: queued, running (with its epoch / trial progress), done in
  N s (with its score), failed. On a terminal it is a live ``rich`` table; otherwise (CI, a pipe)
  a plain line is printed when a task starts or ends, and at most every ``PLAIN_PROGRESS_EVERY_S``
  while it runs; notes the user must know (training from random weights) are shown once;
* ``mode="stream"`` (``--verbose``) prints everything as the runner does, and still writes the logs.

Nothing of kfp is replaced: the view swaps ``sys.stdout``/``sys.stderr`` and the root logger's
handlers for the run, and restores them (:mod:`m2snet.kubeflow.process_state`), an exception included.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
import textwrap
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence, TextIO

from rich.console import Console
from rich.live import Live
from rich.table import Table

from m2snet import progress
from m2snet.kubeflow.process_state import (
    environment,
    root_log_handlers,
    standard_streams,
    warnings_through_logging,
)
from m2snet.redaction import redact

PLAIN_PROGRESS_EVERY_S = 60.0  # a non-terminal console gets a progress line at most this often per task
LOG_TAIL_LINES = 40
POLL_S = 0.25  # how often the events file is read
_ANSI = "\x1b["


# --- the plan: the pipeline spec's tasks -------------------------------------------------------------
def _topological(tasks: Mapping[str, dict]) -> list[str]:
    """Task names of one DAG, each after the tasks it depends on (ties: by name, for a stable order)."""
    done: list[str] = []
    pending = dict(sorted(tasks.items()))
    while pending:
        ready = [n for n, t in pending.items() if all(d in done or d not in tasks for d in t.get("dependentTasks", []))]
        for name in ready or list(pending)[:1]:  # a cycle cannot happen in a valid spec; never loop forever
            done.append(name)
            pending.pop(name)
    return done


def planned_tasks(spec: Any, loop_items: int | Sequence[Any] = 1) -> list[tuple[str, str]]:
    """``(key, label)`` of every task a run of the pipeline ``spec`` executes, in dependency order.

    ``spec``: a pipeline function (kfp ``GraphComponent``), its ``PipelineSpec`` proto or that as a dict
    (a compiled YAML's first document). A task's label is its display name (``set_display_name``; the
    task name otherwise); a loop's (``dsl.ParallelFor``) tasks are listed ``loop_items`` times, keyed
    ``<component>-<i>`` and labelled ``<display name> <i>``: the key a task announces with
    ``progress.task_started(component, i)``. ``loop_items``: the items (an int n: ``0 .. n-1``).
    """
    if hasattr(spec, "pipeline_spec"):
        spec = spec.pipeline_spec
    if not isinstance(spec, Mapping):
        from google.protobuf import json_format

        spec = json_format.MessageToDict(spec)
    components = spec.get("components", {})
    plan: list[tuple[str, str]] = []

    def walk(dag: Mapping[str, Any], item: int | None) -> None:
        tasks = dag.get("tasks", {})
        for name in _topological(tasks):
            task = tasks[name]
            ref = task.get("componentRef", {}).get("name", "")
            component = components.get(ref, {})
            if "dag" in component:
                looped = "parameterIterator" in task or "artifactIterator" in task
                for i in ((range(loop_items) if isinstance(loop_items, int) else loop_items) if looped else [item]):
                    walk(component["dag"], i)
                continue
            label = task.get("taskInfo", {}).get("name") or name
            key = ref.removeprefix("comp-") or name
            plan.append((key, label) if item is None else (progress.task_key(key, item), f"{label} {item}"))

    walk(spec.get("root", {}).get("dag", {}), None)
    return plan


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return ""
    if seconds < 59.5:
        return f"{seconds:.0f} s" if seconds >= 10 else f"{seconds:.1f} s"
    whole = round(seconds)
    return f"{whole // 60} min {whole % 60:02d} s"


def _plain_text(text: str) -> str:
    """``text`` without ANSI colour codes (kfp colours its task names; a log file wants plain text)."""
    while (start := text.find(_ANSI)) >= 0:
        end = text.find("m", start)
        text = text[:start] + (text[end + 1:] if end >= 0 else "")
    return text


@dataclass
class TaskState:
    key: str  # "train-fold-2": the log file's stem
    label: str  # "train fold 2"
    log: Path
    state: str = "queued"  # queued | running | done | failed | skipped
    started: float | None = None  # time.time() of its task_start event
    ended: float | None = None
    progress: str = ""  # "epoch 3/50 · val Dice 0.712"
    error: str = ""  # a failed task's exception, as its task_end event reported it
    result: str = ""  # "Dice 0.795 on 40 cases" once done
    last_plain: float = 0.0
    trial: tuple[int, int] = (0, 0)  # a tuning task: (running trial, trial budget)

    @property
    def seconds(self) -> float | None:
        if self.started is None:
            return None
        return (self.ended or time.time()) - self.started

    def tail(self, n: int = LOG_TAIL_LINES) -> str:
        """The end of the task's log: from its last traceback on if it has one, at most ``n`` lines."""
        try:
            lines = self.log.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        starts = [i for i, line in enumerate(lines) if line.strip() == "Traceback (most recent call last):"]
        lines = lines[starts[-1]:] if starts else lines
        return textwrap.dedent("\n".join(lines[-n:])).strip()


class _ThreadRouter:
    """A ``sys.stdout`` stand-in: each thread's text goes to the log of the task whose stream it prints."""

    def __init__(self, view: "RunView", echo: TextIO | None):
        self._view = view
        self._echo = echo  # the real stdout in stream mode

    def write(self, text: str) -> int:
        self._view._write(text)
        if self._echo is not None:
            self._echo.write(redact(text))
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
    """Console + per-task logs for one local pipeline run (a context manager around the run).

    ``plan``: the ``(key, label)`` of the tasks to list (:func:`planned_tasks`); tasks that announce
    themselves without being planned are added as they start.
    """

    def __init__(self, log_dir: str | Path, plan: list[tuple[str, str]], *, mode: str = "auto",
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
        self.events = self.log_dir / "events.jsonl"
        self.tasks: dict[str, TaskState] = {}
        for key, label in plan:
            self._task(key, label)
        self.notes: list[str] = []  # notes shown once
        self.promotion: str = ""  # the promote step's reason
        self.pipeline_run_id: str = ""  # the runner's job id, from a task's task_start context
        self.t0 = time.monotonic()
        self._lock = threading.RLock()
        self._thread = threading.local()  # .task: the task whose stream this thread prints; .partial: a line
        self._files: dict[str | None, TextIO] = {}
        self._live = None
        self._borrowed = contextlib.ExitStack()  # the process state swapped for the run, given back on exit
        self._offset = 0
        self._stop = threading.Event()
        self._tailer: threading.Thread | None = None

    # --- tasks ---------------------------------------------------------------------------------
    def _task(self, key: str, label: str | None = None) -> TaskState:
        if key not in self.tasks:
            self.tasks[key] = TaskState(key, label or key, self.log_dir / f"{key}.log")
        return self.tasks[key]

    @property
    def failed(self) -> list[TaskState]:
        return [t for t in self.tasks.values() if t.state == "failed"]

    def _started(self, task: TaskState, when: float) -> None:
        task.state, task.started, task.ended, task.progress = "running", when, None, ""
        self._plain(task, "running")

    def _finished(self, task: TaskState, ok: bool, when: float) -> None:
        if task.state not in ("running", "queued"):
            return
        task.state, task.ended = ("done" if ok else "failed"), when
        text = f"done in {_duration(task.seconds)}" if ok else f"FAILED after {_duration(task.seconds)}"
        self._plain(task, text + (f"  {task.result}" if ok and task.result else "") + f"  log: {task.log.name}")

    def mark_skipped(self) -> None:
        """After a failed run: tasks still running died without a word (failed); queued ones never ran."""
        with self._lock:
            self.poll()
            for task in self.tasks.values():
                if task.state == "running":
                    self._finished(task, False, time.time())
                elif task.state == "queued":
                    task.state = "skipped"
            self._refresh()

    # --- progress events -------------------------------------------------------------------------
    def poll(self) -> None:
        """Apply the events appended to the events file since the last call (complete lines only)."""
        with self._lock:
            try:
                with open(self.events, "rb") as f:
                    f.seek(self._offset)
                    data = f.read()
            except FileNotFoundError:
                return
            end = data.rfind(b"\n") + 1
            self._offset += end
            for line in data[:end].splitlines():
                try:
                    event = json.loads(line)
                except ValueError:
                    continue
                if isinstance(event, dict):
                    self.apply(event)
            self._refresh()

    def apply(self, event: Mapping[str, Any]) -> None:
        """Update the table from one progress event (see :mod:`m2snet.progress` for the kinds)."""
        kind, when = event.get("kind"), float(event.get("time") or time.time())
        if kind == "note":
            self._note(str(event.get("message", "")))
            return
        if not event.get("task"):
            return
        task = self._task(str(event["task"]))
        if kind == "task_start":
            self.pipeline_run_id = self.pipeline_run_id or str(event.get("pipeline_run_id") or "")
            self._started(task, when)
        elif kind == "task_end":
            task.error = redact(str(event.get("error") or ""))
            self._finished(task, bool(event.get("ok")), when)
        elif kind == "trial":
            task.trial = (int(event.get("number", 0)) + 1, int(event.get("of", 0)))
            task.progress = f"trial {task.trial[0]}/{task.trial[1]}"
        elif kind == "epoch":
            self._epoch(task, event)
        elif kind == "evaluated":
            task.result = f"Dice {float(event['dice']):.3f} on {event['cases']} cases"
        elif kind == "promotion":
            self.promotion = str(event.get("reason", ""))
            task.result = "promoted" if event.get("promoted") else "not promoted"

    def _epoch(self, task: TaskState, event: Mapping[str, Any]) -> None:
        val = event.get("val_dice")
        epoch = f"epoch {event['epoch']}/{event['epochs']}"
        epoch += f" · val Dice {float(val):.3f}" if val is not None else ""
        if task.trial[1]:
            task.progress = f"trial {task.trial[0]}/{task.trial[1]} · {epoch}"
        else:
            task.progress = epoch
            if val is not None:
                task.result = f"last val Dice {float(val):.3f}"
        if task.state == "running" and time.monotonic() - task.last_plain >= PLAIN_PROGRESS_EVERY_S:
            self._plain(task, task.progress)

    def _note(self, message: str) -> None:
        if not message or message in self.notes:
            return
        self.notes.append(message)
        if self.mode == "plain":
            self._print(f"note: {message}")
        elif self.mode == "live" and self._live is not None:
            self._live.console.print(f"[yellow]note:[/] {message}", highlight=False)

    def _tail_events(self) -> None:
        while not self._stop.wait(POLL_S):
            self.poll()

    # --- the runner's stream -------------------------------------------------------------------
    def _write(self, text: str) -> None:
        """A thread's text: whole lines to the log of the task it is streaming (between its marks)."""
        thread = self._thread
        lines = (getattr(thread, "partial", "") + text).split("\n")
        thread.partial = lines.pop()
        for line in lines:
            self._line(line + "\n")

    def _line(self, line: str) -> None:
        thread = self._thread
        mark = progress.parse_mark(line)
        if mark is not None:  # the task's own stream starts or ends here; the mark itself is no log line
            thread.task = str(mark["task"]) if mark.get("event") == "start" else None
            return
        key = getattr(thread, "task", None)
        with self._lock:
            f = self._files.get(key)
            if f is None:
                path = self._task(key).log if key else self.main_log
                f = self._files[key] = open(path, "a", encoding="utf-8", errors="replace")
            # Masked as written: a task's libraries print what they were given (dvc's clone error quotes the
            # repository URL with its password and token), and a failed task's log is uploaded to MLflow.
            f.write(redact(_plain_text(line)))
            f.flush()

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
        with contextlib.ExitStack() as borrowed:  # a failure on the way in gives back what was taken
            # The task processes inherit the events file's path.
            borrowed.enter_context(environment(**{progress.ENV: str(self.events.resolve())}))
            router = _ThreadRouter(self, sys.stdout if self.mode == "stream" else None)
            if self.mode == "stream":
                borrowed.enter_context(standard_streams(router))
            else:
                # The parent process's own logging and warnings: into pipeline.log (or the task's log).
                borrowed.enter_context(standard_streams(router, router))
                handler = logging.StreamHandler(router)
                handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s",
                                                       "%H:%M:%S"))
                borrowed.enter_context(root_log_handlers([handler]))
                # Warnings through logging (masked there, see install_redaction).
                borrowed.enter_context(warnings_through_logging())
            self._tailer = threading.Thread(target=self._tail_events, name="m2snet-runview-events", daemon=True)
            self._tailer.start()
            borrowed.callback(self._stop_tailer)
            if self.mode == "live":
                console = Console(file=self.stream, force_terminal=True)
                self._live = Live(self.table(), console=console, refresh_per_second=4, transient=False,
                                  redirect_stdout=False, redirect_stderr=False, get_renderable=self.table)
                self._live.start()
            self._borrowed = borrowed.pop_all()
        return self

    def _stop_tailer(self) -> None:
        self._stop.set()
        if self._tailer is not None:
            self._tailer.join()

    def __exit__(self, *exc: Any) -> None:
        try:
            self._stop_tailer()
            self.poll()  # the last events (a task's end) written before the runner returned
            if self._live is not None:
                self._live.update(self.table(), refresh=True)
                self._live.stop()
                self._live = None
        finally:
            self._borrowed.close()
            with self._lock:
                for f in self._files.values():
                    f.close()
                self._files.clear()
