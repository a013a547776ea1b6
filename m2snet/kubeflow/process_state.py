"""Process-wide state a local pipeline run borrows, each as a context manager that gives it back.

A local run points environment variables at its own store and files (the task subprocesses inherit
them), takes ``sys.stdout``/``sys.stderr`` and the root logger's handlers over for its console, and
routes warnings through logging. Each swap here restores exactly what was there before on exit, an
exception included, so a caller (a test, a notebook, a second run in one process) finds its process as
it left it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from typing import Iterator, Sequence, TextIO


@contextlib.contextmanager
def environment(**values: str | None) -> Iterator[None]:
    """Set (a string) or unset (``None``) environment variables for the block; restore each one's previous
    value, or its absence, on exit."""
    previous = {name: os.environ.get(name) for name in values}
    try:
        for name, value in values.items():
            _put(name, value)
        yield
    finally:
        for name, value in previous.items():
            _put(name, value)


@contextlib.contextmanager
def environment_defaults(**values: str) -> Iterator[None]:
    """``os.environ.setdefault`` for the block: a variable the caller set is kept; one set here is removed
    on exit."""
    with environment(**{name: value for name, value in values.items() if name not in os.environ}):
        yield


def _put(name: str, value: str | None) -> None:
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value


@contextlib.contextmanager
def standard_streams(stdout: TextIO, stderr: TextIO | None = None) -> Iterator[None]:
    """``sys.stdout`` (and ``sys.stderr`` unless ``None``: left as it is) replaced for the block."""
    saved = sys.stdout, sys.stderr
    sys.stdout = stdout  # type: ignore[assignment]
    if stderr is not None:
        sys.stderr = stderr  # type: ignore[assignment]
    try:
        yield
    finally:
        sys.stdout, sys.stderr = saved


@contextlib.contextmanager
def root_log_handlers(handlers: Sequence[logging.Handler]) -> Iterator[None]:
    """The root logger writes to ``handlers`` alone for the block; its own handlers are back on exit."""
    root = logging.getLogger()
    saved = root.handlers[:]
    root.handlers[:] = list(handlers)
    try:
        yield
    finally:
        root.handlers[:] = saved


@contextlib.contextmanager
def warnings_through_logging() -> Iterator[None]:
    """``logging.captureWarnings(True)`` for the block; left on afterwards if it already was."""
    # logging keeps the replaced showwarning here while capture is on: the only public sign of the state.
    already = getattr(logging, "_warnings_showwarning", None) is not None
    if not already:
        logging.captureWarnings(True)
    try:
        yield
    finally:
        if not already:
            logging.captureWarnings(False)
