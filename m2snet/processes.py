"""The processes m2snet starts: finding a tool and its environment, a free port for a server,
whether a pid runs, and stopping them all on SIGINT/SIGTERM.

Keep this module free of heavy imports (torch, mlflow, ...): the CLI imports it at start-up.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from m2snet.errors import M2SNetError
from m2snet.signals import Terminated

SIGNAL_NAMES = {signal.SIGINT: "SIGINT (Ctrl-C)", signal.SIGTERM: "SIGTERM"}
STOP_GRACE_S = 5.0  # how long a stopped child may take to close what it opened before it is killed


@dataclass
class Interruption:
    """What :func:`stop_children_on_signal` saw: the signal that arrived ("" if none), the processes stopped."""

    signal: str = ""
    stopped: int = 0


@contextlib.contextmanager
def stop_children_on_signal(grace_s: float = STOP_GRACE_S, poll_s: float = 0.1) -> Iterator[Interruption]:
    """Within the block (main thread), SIGINT or SIGTERM stops every process this one started, however deep.

    Why: only a terminal's Ctrl-C reaches a command's children (they share its process group); ``kill -INT``,
    a supervisor's SIGTERM or a Ctrl-C to a process that put its children elsewhere reach this process
    alone, and a thread pool that started them (kfp's local runner) waits for them -- and starts its queued
    tasks -- after the main thread was interrupted. On the first signal every descendant gets SIGINT (a
    Python child raises KeyboardInterrupt and closes what it opened, e.g. its MLflow run as KILLED), one
    still alive ``grace_s`` later gets SIGKILL, and so does any that starts after it (a queued task), until
    the block ends; then the main thread gets KeyboardInterrupt (SIGINT) or :class:`Terminated` (SIGTERM).
    A second signal kills them all at once. Leaving the block after a signal, it waits for the stopped
    processes (at most ``grace_s``) and kills what is left; the previous handlers are restored.
    """
    state = Interruption()
    if threading.current_thread() is not threading.main_thread():
        yield state
        return
    import psutil

    me = psutil.Process()
    seen: dict[tuple[int, float], tuple[psutil.Process, float]] = {}  # (pid, start) -> (process, SIGINT time)
    lock, done, urgent = threading.Lock(), threading.Event(), threading.Event()

    def stopped() -> list[tuple[Any, float]]:
        with lock:
            return list(seen.values())

    def sweep(kill_all: bool) -> None:
        now = time.monotonic()
        with contextlib.suppress(psutil.Error):
            for proc in me.children(recursive=True):
                with contextlib.suppress(psutil.Error):
                    key = (proc.pid, proc.create_time())
                    if key not in seen:
                        proc.send_signal(signal.SIGINT)
                        with lock:
                            seen[key] = (proc, now)
        # Stopped ones may have left the tree already (a shell parent died first): kill them by their record.
        for proc, since in stopped():
            if kill_all or now - since >= grace_s:
                with contextlib.suppress(psutil.Error):
                    proc.kill()  # psutil checks the start time: never a recycled pid
        state.stopped = len(seen)

    def reap() -> None:
        while not done.is_set():
            sweep(urgent.is_set())
            done.wait(poll_s)

    reaper = threading.Thread(target=reap, name="m2snet-stop-children", daemon=True)

    def handler(signum, frame):  # signal handler signature
        if state.signal:  # a second signal: no more grace
            urgent.set()
            return
        state.signal = SIGNAL_NAMES.get(signum, f"signal {signum}")
        reaper.start()
        raise KeyboardInterrupt(state.signal) if signum == signal.SIGINT else Terminated(state.signal)

    previous = {sig: signal.signal(sig, handler) for sig in SIGNAL_NAMES}
    try:
        yield state
    finally:
        if state.signal:
            deadline = time.monotonic() + grace_s
            while time.monotonic() < deadline and any(_alive(p) for p, _ in stopped()):
                time.sleep(poll_s)
            urgent.set()
            done.set()
            reaper.join()
            sweep(kill_all=True)
        for sig, before in previous.items():
            signal.signal(sig, before)


def _alive(proc: Any) -> bool:
    import psutil

    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def pid_alive(pid: int) -> bool:
    """Whether a process with this id exists on this host (another user's counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, another user's
    return True



def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def interpreter_bin() -> Path:
    """The bin directory of the running interpreter (a virtualenv's, when m2snet runs from one)."""
    return Path(sys.executable).parent


def find_tool(name: str) -> str:
    """A console script of this environment (mlflow, dvc, weed, ...), else the one on PATH.

    The interpreter's own bin comes first so a non-activated virtualenv (``.venv/bin/m2snet``)
    still runs the versions it was installed with.
    """
    own = interpreter_bin() / name
    if own.exists():
        return str(own)
    found = shutil.which(name)
    if found is None:
        raise M2SNetError(f"`{name}` not found in {interpreter_bin()} or on PATH")
    return found


def tool_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for a child process: ours plus ``extra``, the interpreter's bin first on PATH.

    Tools that start further tools by name (``mlflow models serve`` runs ``uvicorn``) then find
    this environment's copies even when the virtualenv was never activated.
    """
    env = {**os.environ, **(extra or {})}
    env["PATH"] = os.pathsep.join([str(interpreter_bin()), env.get("PATH", "")])
    return env
