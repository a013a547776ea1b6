"""Small helpers shared by every part of the library.

Keep this module free of heavy imports (torch, mlflow, ...): the CLI imports it at start-up.
"""

from __future__ import annotations

import contextlib
import csv
import ctypes
import errno
import fcntl
import functools
import hashlib
import json
import logging
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

from m2snet import __version__

log = logging.getLogger("m2snet")


class M2SNetError(Exception):
    """An error caused by the user's input or environment.

    The CLI prints its message without a traceback and exits non-zero, so the message
    must say which file or setting is wrong and what is wrong with it.
    """


# Database driver modules SQLAlchemy imports for a storage URL -> what to install. A bare postgresql:// is
# psycopg (3) to SQLAlchemy 2.1; this package installs psycopg2 (postgresql+psycopg2://).
DRIVER_PACKAGES = {"psycopg2": "psycopg2-binary", "psycopg": "'psycopg[binary]'", "pg8000": "pg8000",
                    "pymysql": "PyMySQL", "MySQLdb": "mysqlclient"}


def database_driver_hint(module: str) -> str:
    """What to install for a database driver module SQLAlchemy could not import (an MLflow or Optuna store)."""
    import importlib.util

    hint = f"pip install {DRIVER_PACKAGES.get(module, module)}"
    with contextlib.suppress(ImportError, ValueError):  # find_spec raises for a module blocked in sys.modules
        if module == "psycopg" and importlib.util.find_spec("psycopg2") is not None:
            hint += "; or name the installed psycopg2: postgresql+psycopg2://..."
    return hint


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def canonical_json(obj: Any) -> str:
    """JSON with sorted keys and no whitespace: the form we hash."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


# --- secrets: what never reaches a log, an MLflow param/tag/input or a file we write ---------------
# A name that says its value is a secret (a config key, a query parameter).
SECRET_NAME = re.compile(
    r"secret|passw|pwd|token|credential|access_?key|api_?key|private_?key|signature|^sig$|^key$|^auth", re.I)
# A URL's userinfo: everything between "scheme://" and the LAST "@" before the host part ends, so a
# password holding "@" (invalid unescaped, yet common) is covered whole.
_URL_USERINFO = re.compile(r"(?P<scheme>\b[a-z][a-z0-9+.-]*://)(?P<userinfo>[^/?#\s]*)@", re.I)
# A value ends at the next parameter, a fragment, white space or a quote (a URL quoted in an error message).
_QUERY_PARAM = re.compile(r"""(?P<sep>[?&;])(?P<name>[^=&;#\s]+)=(?P<value>[^&;#\s'"<>]*)""")
REDACTED = "***"


def _redact_userinfo(m: re.Match) -> str:
    user, colon, _ = m["userinfo"].partition(":")
    # "user:password@" keeps the user; a lone "TOKEN@" (GitHub, GitLab tokens) may itself be the secret.
    return f"{m['scheme']}{user}:{REDACTED}@" if colon else f"{m['scheme']}{REDACTED}@"


# Environment variables named like secrets that hold none: the working directory (``PWD`` matches "pwd") and
# the *path* of a credentials file (GOOGLE_APPLICATION_CREDENTIALS, AWS_SHARED_CREDENTIALS_FILE).
_NOT_SECRET_ENV = re.compile(r"^(?:OLD)?PWD$|_(?:FILE|PATH|DIR|CREDENTIALS)$", re.I)
# A shorter value is not masked wherever it appears: "pw" or "1" would blank unrelated text, and so little
# entropy is no secret worth the noise. URL userinfo and secret query parameters are masked at any length.
_MIN_ENV_SECRET = 6


def _env_secrets() -> list[str]:
    """Secret values this process holds in its environment: variables named like secrets
    (AWS_SECRET_ACCESS_KEY, MLFLOW_TRACKING_PASSWORD, *_TOKEN, ...) and the passwords inside URLs
    (MLFLOW_TRACKING_URI=http://user:pw@host). Read on every call: tests and tools change the environment."""
    found = set()
    for name, value in os.environ.items():
        if SECRET_NAME.search(name) and not _NOT_SECRET_ENV.search(name):
            found.add(value.strip())
        for m in _URL_USERINFO.finditer(value):
            found.add(m["userinfo"].partition(":")[2] or m["userinfo"])
    # Longest first: a secret that contains another is masked whole.
    return sorted((s for s in found if len(s) >= _MIN_ENV_SECRET), key=len, reverse=True)


def redact(value: Any) -> Any:
    """``value`` with the credentials it holds masked; non-strings are returned as they are.

    Masks, in URLs: ``user:password@`` (keeping the user), a token-only ``TOKEN@`` and the values of
    secret-named query parameters (``?password=``, ``&token=``, ``access_key=``, ``X-Amz-Signature=``,
    ``sig=``, ...); anywhere: the value of a secret-named environment variable (``AWS_SECRET_ACCESS_KEY``,
    ``MLFLOW_TRACKING_PASSWORD``, ...) or a password inside a URL-valued one. THE redaction: every line
    that leaves the process goes through it (:func:`install_redaction` for logs and warnings, the CLI's
    error line, MLflow params/tags/descriptions, log files uploaded as artifacts).
    """
    if not isinstance(value, str):
        return value
    text = _URL_USERINFO.sub(_redact_userinfo, value)
    text = _QUERY_PARAM.sub(
        lambda m: f"{m['sep']}{m['name']}={REDACTED}" if SECRET_NAME.search(m["name"]) else m[0], text)
    for secret in _env_secrets():
        text = text.replace(secret, REDACTED)
    return text


def _redact_record(record: logging.LogRecord) -> None:
    """Mask the message, exception and stack text of ``record`` in place (all of them: a library's
    exception message repeats the URL it failed on)."""
    try:
        message = record.getMessage()
    except Exception:  # noqa: BLE001 -- a malformed format call: logging reports it when the record is emitted
        return
    clean = redact(message)
    if clean != message:
        record.msg, record.args = clean, None
    if record.exc_info and record.exc_info[0] is not None and not record.exc_text:
        # Formatter.format uses exc_text when set: the traceback is formatted once, here, masked.
        record.exc_text = redact(logging.Formatter().formatException(record.exc_info))
    if record.stack_info:
        record.stack_info = redact(record.stack_info)


def install_redaction() -> None:
    """Mask secrets in every log record of this process, whichever logger made it and whichever handler
    writes it (ours, MLflow's own stream handler, a task's log file), and route ``warnings`` through
    logging so library warnings (urllib3's retries print the URL with its ``?token=``) are masked too.

    Done in the record factory rather than in a filter on the root handlers: MLflow's logger writes
    through its own handler and does not propagate. Idempotent.
    """
    factory = logging.getLogRecordFactory()
    if getattr(factory, "m2snet_redacting", False):
        return

    def redacting_factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = factory(*args, **kwargs)
        _redact_record(record)
        return record

    redacting_factory.m2snet_redacting = True  # type: ignore[attr-defined]
    logging.setLogRecordFactory(redacting_factory)
    logging.captureWarnings(True)


def current_umask() -> int:
    """The process umask (read by setting and restoring it: POSIX has no getter)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def umask_mode(directory: bool = False) -> int:
    """The mode a plain ``open()``/``mkdir()`` would give: 0644 / 0755 under the usual umask 022.

    ``tempfile.mkstemp``/``mkdtemp`` create 0600 / 0700 whatever the umask; a temporary renamed into
    place gets this mode first, so other users, containers and pipeline steps can read it.
    """
    return (0o777 if directory else 0o666) & ~current_umask()


def _cannot_write(path: Path, err: OSError) -> M2SNetError:
    """One line for an OSError met creating ``path`` or its folder (read-only, under a file, /proc)."""
    reason = "not a directory" if isinstance(err, (FileExistsError, NotADirectoryError)) else err.strerror or str(err)
    where = f": {err.filename}" if err.filename and str(err.filename) != str(path) else ""
    return M2SNetError(f"{path}: cannot write there ({reason}{where})")


def _make_parent(path: Path) -> None:
    """Create ``path``'s folder; a folder that cannot be made (read-only, under a file, /proc) is a user error."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise _cannot_write(path, err) from None


def _fsync_directory(path: Path) -> None:
    """Make a rename in ``path`` durable (best effort: some filesystems cannot fsync a directory)."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, mode: int | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it becomes ``path``, whole, or nothing does.

    THE way m2snet writes a result file (JSON, CSV, report, plot, manifest, checkpoint, ONNX graph):
    the caller writes the temporary by name (``open``, ``torch.save``, ``savefig(tmp, format=...)``:
    the temporary's suffix is ``.tmp``). On success it gets the umask's mode (mkstemp's is a private
    0600, which hid checkpoints from other users and containers) or ``mode`` (0o600 for a file
    holding secrets: it is never readable by others, not even for a moment), is flushed to disk
    (fsync) and renamed over ``path`` (atomic: a reader sees the old file or the new one). On any
    exception, Ctrl-C or SIGTERM the temporary is removed and ``path`` is untouched.
    """
    path = Path(path)
    _make_parent(path)
    with _sigterm_raises():
        try:
            fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        except OSError as err:
            raise _cannot_write(path, err) from None
        os.close(fd)
        tmp = Path(name)
        try:
            yield tmp
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fchmod(fd, umask_mode() if mode is None else mode)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
    _fsync_directory(path.parent)


def read_json(path: str | os.PathLike, what: str) -> Any:
    """The JSON document in ``path`` (``what``: what the file is, e.g. "split file"); a missing, unreadable
    or invalid file raises one line of :class:`M2SNetError` naming it."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise M2SNetError(f"{path}: {what} not found") from None
    except (OSError, UnicodeDecodeError) as err:
        raise M2SNetError(f"{path}: cannot read the {what} ({err})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise M2SNetError(f"{path}: invalid JSON in the {what} ({err})") from None


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write JSON atomically (:func:`atomic_file`), so a crash never leaves half a file."""
    with atomic_file(path) as tmp, open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True, default=str)
        f.write("\n")


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write a text result (report, table) atomically (:func:`atomic_file`)."""
    with atomic_file(path) as tmp:
        tmp.write_text(text)


def write_csv(path: str | os.PathLike, rows: Iterable[Mapping[str, Any]], columns: Sequence[str]) -> None:
    """Write rows as CSV (a header of ``columns``, ``\\n`` line ends) atomically (:func:`atomic_file`)."""
    with atomic_file(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)


class Terminated(BaseException):
    """SIGTERM, raised as an exception while an atomic directory is being written, so it is cleaned up."""


@contextlib.contextmanager
def _sigterm_raises() -> Iterator[None]:
    """Within the block (main thread only), SIGTERM raises :class:`Terminated` instead of killing.

    SIGINT already raises KeyboardInterrupt. The previous handler is restored on exit; a SIGTERM
    that arrives then still ends the process, with the exit status a default SIGTERM gives (143).
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):  # signal handler signature
        raise Terminated("partial output removed")  # atomic_file / atomic_directory remove it on the way out

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


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


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """SIGTERM and SIGINT are held back during the block and delivered at its end, so a pair of
    renames is never split by them (a SIGKILL can still split it: :func:`remove_stale_partials`)."""
    held = {signal.SIGTERM, signal.SIGINT}
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


# Beside DEST, named after it: ``.<name>.<host>-<pid>.<random>.partial`` is a copy being written
# (or, after an exchange, the replaced DEST being removed); ``...<random>.old`` is DEST moved aside
# by the fallback swap; ``.<name>.lock`` is the writers' lock.
_PARTIAL_SUFFIX = ".partial"
_ASIDE_SUFFIX = ".old"
_LOCK_SUFFIX = "lock"


def _partial_prefix(dest: Path) -> str:
    return f".{dest.name}."


def pid_alive(pid: int) -> bool:
    """Whether a process with this id exists on this host (another user's counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, another user's
    return True


def remove_stale_partials(dest: str | os.PathLike) -> list[Path]:
    """Clean up what a killed writer (SIGKILL, power loss) left beside ``dest``.

    A partial (``.<dest name>.<host>-<pid>.<random>.partial``) is stale when it was made on this host
    by a process that no longer runs (or carries no pid: an older m2snet's); it is removed. A stale
    ``.old`` is the previous ``dest`` that a fallback swap had moved aside: it is put back when
    ``dest`` is missing (the writer died between its two renames), removed otherwise. A live
    process's (a concurrent writer's) are left alone. Returns what was removed.
    """
    dest = Path(dest)
    if not dest.parent.is_dir():
        return []
    prefix, host = _partial_prefix(dest), socket.gethostname()
    suffixes = f"(?:{re.escape(_PARTIAL_SUFFIX)}|{re.escape(_ASIDE_SUFFIX)})"
    tagged = re.compile(rf"^{re.escape(prefix)}(?P<host>.+)-(?P<pid>\d+)\.[^.]+{suffixes}$")
    removed = []
    # Old copies first: one may have to become ``dest`` again.
    for path in sorted(dest.parent.iterdir(), key=lambda p: not p.name.endswith(_ASIDE_SUFFIX)):
        if not (path.name.startswith(prefix) and path.name.endswith((_PARTIAL_SUFFIX, _ASIDE_SUFFIX))
                and path.is_dir() and not path.is_symlink()):
            continue
        m = tagged.match(path.name)
        if m and (m.group("host") != host or pid_alive(int(m.group("pid")))):
            continue
        if path.name.endswith(_ASIDE_SUFFIX) and not os.path.lexists(dest):
            os.rename(path, dest)
            log.warning("restored %s from %s: a replacement interrupted by a killed run", dest, path)
            continue
        shutil.rmtree(path, ignore_errors=True)
        log.warning("removed %s: a partial output left by a killed run", path)
        removed.append(path)
    return removed


@contextlib.contextmanager
def writer_lock(dest: str | os.PathLike, *, wait: bool = False) -> Iterator[None]:
    """Hold ``.<name>.lock`` beside ``dest`` (``flock``): one writer per DEST at a time.

    Not waiting (the default), a second writer fails at once with a one-line error instead of racing
    the first (the later one replaced the earlier, both exiting 0); ``wait=True`` queues it behind the
    first instead (a one-off set-up that the second must find done, e.g. a fresh database's schema). The
    file is removed on release so it never lingers beside the output; a file a SIGKILLed holder left
    is simply locked and removed by the next writer (the kernel drops the lock with the process).
    """
    dest = Path(dest)
    lock_path = dest.parent / f"{_partial_prefix(dest)}{_LOCK_SUFFIX}"
    while True:
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, umask_mode())
        except OSError as err:
            raise _cannot_write(dest, err) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            holder = os.read(fd, 200).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise M2SNetError(
                f"{dest}: another m2snet process ({holder}) is writing it; wait for it to finish or choose "
                f"another DEST (lock: {lock_path})"
            ) from None
        # The previous holder unlinks the file before unlocking it: a lock taken on a file that is no
        # longer at ``lock_path`` excludes nobody, so take the one that is there now.
        try:
            same = os.stat(lock_path, follow_symlinks=False).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(lock_path)
        os.close(fd)


@functools.lru_cache(maxsize=1)
def _renameat2() -> Any:
    """libc's ``renameat2`` (Linux, glibc >= 2.28), or None where there is none."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_AT_FDCWD, _RENAME_EXCHANGE = -100, 2


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one atomic step (``renameat2(RENAME_EXCHANGE)``); False where the
    kernel, the C library or the filesystem cannot, so the caller falls back."""
    fn = _renameat2()
    if fn is None:
        return False
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _swap_in(tmp: Path, dest: Path) -> Path:
    """Put the directory ``tmp`` at ``dest`` in place of the directory there; return where the replaced
    copy now is (to be removed). At every instant ``dest`` is the old copy or the new one, complete.

    Exchange where the kernel can; else move ``dest`` aside (``.old``) and rename ``tmp`` in, with
    SIGTERM/SIGINT held back in between; a SIGKILL in between leaves ``dest`` missing and the old copy
    aside, which the next writer puts back (:func:`remove_stale_partials`).
    """
    with _signals_deferred():
        if _exchange(tmp, dest):
            return tmp  # the old DEST, under the partial's name: stale, hence removed, if we die now
        aside = tmp.with_name(tmp.name[: -len(_PARTIAL_SUFFIX)] + _ASIDE_SUFFIX)
        os.rename(dest, aside)
        try:
            os.rename(tmp, dest)
        except BaseException:
            os.rename(aside, dest)
            raise
        return aside


def _check_destination(dest: Path, overwrite: bool, marker: str | None) -> None:
    """Refuse a DEST that must not be written, before any work: a symlink, a file, a non-empty folder
    (without ``overwrite``), or, with ``overwrite``, a folder that is not a previous output (no ``marker``)."""
    if dest.is_symlink():
        raise M2SNetError(f"{dest}: is a symbolic link; give the directory itself or choose another DEST")
    if not dest.exists():
        return
    if not dest.is_dir():
        raise M2SNetError(f"{dest}: is a file, not a directory; choose another DEST")
    if not any(dest.iterdir()):
        return  # an empty folder is replaced by the rename
    ours = marker is None or (dest / marker).is_file()
    if not ours:
        raise M2SNetError(
            f"{dest}: already exists and is not an m2snet output (no {marker}); --overwrite replaces only "
            "a previous output: choose another DEST"
        )
    if not overwrite:
        raise M2SNetError(f"{dest}: already exists and is not empty (use --overwrite to replace it)")


def _check_outside(dest: Path, protect: tuple[str | os.PathLike, ...]) -> None:
    """Refuse a DEST that is, contains or sits inside a protected path (the source), symlinks resolved."""
    real = dest.resolve()
    for path in protect:
        source = Path(path).resolve()
        if real == source:
            why = "is the source"
        elif source.is_relative_to(real):
            why = f"contains the source {path}"
        elif real.is_relative_to(source):
            why = f"is inside the source {path}"
        else:
            continue
        raise M2SNetError(f"{dest}: {why}; write the output to a folder outside it")


@contextlib.contextmanager
def atomic_directory(
    dest: str | os.PathLike,
    overwrite: bool = False,
    *,
    shared: bool = False,
    marker: str | None = None,
    protect: tuple[str | os.PathLike, ...] = (),
) -> Iterator[Path]:
    """Yield a temporary directory beside ``dest``; move it to ``dest`` only on success.

    On any exception, Ctrl-C (SIGINT) or SIGTERM the temporary directory is removed and ``dest``
    is left untouched, so a failed import or export never leaves a half-written output behind.
    What a SIGKILL leaves is cleaned up by the next write to the same ``dest``
    (:func:`remove_stale_partials`). The result has the process umask's mode (0755 under 022),
    not mkdtemp's private 0700.

    An output (the default) has one writer at a time (a lock beside ``dest``; a second writer fails
    with a one-line error) and is checked before any work: never a DEST that is, contains or sits
    inside a path of ``protect``; with ``overwrite`` only a directory holding ``marker`` (a previous
    output) or an empty one is replaced, atomically (:func:`_swap_in`), the old copy removed after.

    ``shared=True`` is for a cache that several processes may build at once (parallel folds): no
    lock, and the first to finish wins. A finished ``dest`` is never removed or replaced (another
    process may be reading it); a later builder discards its copy. The caller checks ``dest`` after.
    """
    dest = Path(dest)
    if shared and overwrite:
        raise ValueError("atomic_directory: a shared directory is never overwritten")
    _check_outside(dest, protect)
    _make_parent(dest)
    with _sigterm_raises(), (contextlib.nullcontext() if shared else writer_lock(dest)):
        if not shared:
            _check_destination(dest, overwrite, marker)
        remove_stale_partials(dest)
        try:
            tmp = Path(tempfile.mkdtemp(
                dir=dest.parent, prefix=f"{_partial_prefix(dest)}{socket.gethostname()}-{os.getpid()}.",
                suffix=_PARTIAL_SUFFIX,
            ))
        except OSError as err:
            raise _cannot_write(dest, err) from None
        replaced = None
        try:
            os.chmod(tmp, umask_mode(directory=True))
            yield tmp
            try:
                os.rename(tmp, dest)  # atomic; replaces an empty directory, never a non-empty one
            except OSError as err:
                if err.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                    raise
                if shared:
                    log.info("%s: another process finished it first; using theirs", dest)
                    shutil.rmtree(tmp, ignore_errors=True)
                elif overwrite:
                    replaced = _swap_in(tmp, dest)
                else:  # not an m2snet writer (it would hold the lock): never replace its output
                    raise M2SNetError(f"{dest}: was created by another program while this one wrote it; "
                                      "not replaced") from None
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if replaced is not None:
            shutil.rmtree(replaced, ignore_errors=True)
            if replaced.exists():  # e.g. a file another user owns: the next writer retries
                log.warning("%s: could not remove all of the replaced copy %s", dest, replaced)
        _fsync_directory(dest.parent)


def git_commit(cwd: str | os.PathLike | None = None) -> str:
    """The code version: the git commit (with '+dirty' for local changes), else the package version."""
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd or Path(__file__).parent,
            capture_output=True, text=True, check=True, timeout=10,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd or Path(__file__).parent,
            capture_output=True, text=True, check=True, timeout=10,
        ).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return f"m2snet-{__version__}"


def seed_everything(seed: int, deterministic: bool = False) -> None:
    """Seed python, numpy and torch; optionally ask torch for deterministic kernels."""
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


def resolve_device(device: str = "auto") -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise M2SNetError(f"device {device!r} requested but CUDA is not available on this machine")
    return device


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
