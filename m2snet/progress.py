"""Progress as data: steps append JSON-lines events that a console reads, instead of it parsing log prose.

    emit("epoch", epoch=3, epochs=50, loss=0.41, val_dice=0.71)

appends ``{"kind": "epoch", "time": ..., "pid": ..., "task": "train-fold-2", "epoch": 3, ...}`` to the
file named by ``$M2SNET_PROGRESS_FILE``; with the variable unset (a cluster, the CLI) it does nothing.
Each event is one ``os.write`` of a whole line on an ``O_APPEND`` descriptor, so the pipeline's
concurrent task processes can share one file without interleaving.

A pipeline task process announces itself with :func:`task_started` (its component and loop item,
e.g. the fold): a ``task_start`` event, a ``task_end`` one when the process exits, and a
:data:`TASK_MARK` line on its stdout at both ends, by which the local console files the runner's
stream of that task into the task's own log. Event kinds and their fields:

    task_start  component, item (loop item), context      task_end  ok, error (the exception, one line)
    epoch       epoch, epochs, loss, val_dice (if scored) trial     number, of (the study's trial budget)
    evaluated   cases, dice                               promotion version, promoted, reason
    note        message (shown to the user once: e.g. training from random weights)

This module is the lowest layer: it imports nothing from m2snet.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import sys
import time
from typing import Any

ENV = "M2SNET_PROGRESS_FILE"
# A task process's stdout line at its start and end: ``m2snet-task {"task": "train-fold-2", "event": "start"}``.
TASK_MARK = "m2snet-task "

log = logging.getLogger("m2snet.progress")
_task = ""  # this process's pipeline task, once task_started was called


def enabled() -> bool:
    return bool(os.environ.get(ENV))


def emit(kind: str, **fields: Any) -> None:
    """Append one event (``kind`` and ``fields``, JSON-serialisable) to ``$M2SNET_PROGRESS_FILE``, if set."""
    path = os.environ.get(ENV)
    if not path:
        return
    event = {"kind": kind, "time": time.time(), "pid": os.getpid(), **({"task": _task} if _task else {}), **fields}
    line = (json.dumps(event, default=str) + "\n").encode()
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line)
        finally:
            os.close(fd)
    except OSError as err:  # progress is for the operator's console: it never fails the work
        log.debug("progress event %s not written to %s: %s", kind, path, err)


PLAIN_BAR_EVERY_S = 30.0  # a progress bar on a non-terminal stream: one plain line at most this often


class _PlainLines:
    """A file for tqdm on a stream that is no terminal (a log file, a pipe): each redraw becomes one plain
    line, and clearing a bar (``\\r`` alone) writes nothing -- no carriage-return floods in a log."""

    def __init__(self, stream: Any):
        self.stream = stream

    def write(self, text: str) -> None:
        line = text.replace("\r", "").rstrip()
        if line:
            self.stream.write(line + "\n")

    def flush(self) -> None:
        self.stream.flush()


def bar(iterable: Any = None, *, desc: str, total: int | None = None, unit: str = "it", disable: bool = False,
        leave: bool = True):
    """The package's progress bar (a ``tqdm``): live on a terminal; on anything else (``m2snet train > log``,
    a pipeline task's piped output) a plain ``desc: n/total [elapsed<remaining]`` line every
    :data:`PLAIN_BAR_EVERY_S` and a last one at the end, for a loop that lasts that long; a shorter one prints
    nothing (the work's own log lines, e.g. the trainer's per-epoch line, say it ended)."""
    from tqdm import tqdm

    stream = sys.stderr
    if disable or stream.isatty():
        return tqdm(iterable, desc=desc, total=total, unit=unit, disable=disable, leave=leave, file=stream)
    return tqdm(iterable, desc=desc, total=total, unit=unit, leave=True, file=_PlainLines(stream),
                mininterval=PLAIN_BAR_EVERY_S, maxinterval=PLAIN_BAR_EVERY_S, delay=PLAIN_BAR_EVERY_S,
                bar_format="{desc}: {n_fmt}/{total_fmt} {unit} [{elapsed}<{remaining}, {rate_fmt}{postfix}]")


def task_key(component: str, item: Any = None) -> str:
    """The console's key of a task: its component, with its loop item (``train-fold-2``)."""
    return component if item is None else f"{component}-{item}"


def parse_mark(line: str) -> dict[str, str] | None:
    """The ``{"task", "event"}`` of a :data:`TASK_MARK` line, else None."""
    text = line.strip()
    if not text.startswith(TASK_MARK):
        return None
    try:
        mark = json.loads(text[len(TASK_MARK):])
    except ValueError:
        return None
    return mark if isinstance(mark, dict) and "task" in mark else None


def task_started(component: str, item: Any = None, **context: Any) -> str:
    """Announce this process as pipeline task ``component`` (``item``: its loop item, e.g. the fold); its key.

    ``context`` (e.g. ``pipeline_run_id``) goes into the ``task_start`` event. The process's later events
    carry the key; at exit a ``task_end`` event says whether an uncaught exception ended it.
    """
    global _task
    key = task_key(component, item)
    if not enabled():
        return key
    _task = key
    emit("task_start", component=component, **({"item": item} if item is not None else {}), **context)
    _mark("start")
    atexit.register(_task_ended)
    return key


def _mark(event: str) -> None:
    print(TASK_MARK + json.dumps({"task": _task, "event": event}), flush=True)


def _task_ended() -> None:
    # An uncaught exception was printed (and stored in sys.last_value) before atexit handlers run.
    err = getattr(sys, "last_value", None)
    if err is None:
        emit("task_end", ok=True)
    else:  # the exception on one line, as the console's failure message
        message = " ".join(line.strip() for line in str(err).splitlines() if line.strip())
        emit("task_end", ok=False, error=f"{type(err).__name__}: {message}"[:1000])
    sys.stderr.flush()
    _mark("end")
