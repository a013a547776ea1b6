"""Small helpers shared by every part of the library.

Keep this module free of heavy imports (torch, mlflow, ...): the CLI imports it at start-up.
"""

from __future__ import annotations

import contextlib
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
from pathlib import Path
from typing import Any, Iterator

from m2snet import __version__

log = logging.getLogger("m2snet")


class M2SNetError(Exception):
    """An error caused by the user's input or environment.

    The CLI prints its message without a traceback and exits non-zero, so the message
    must say which file or setting is wrong and what is wrong with it.
    """


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
_QUERY_PARAM = re.compile(r"(?P<sep>[?&;])(?P<name>[^=&;#\s]+)=(?P<value>[^&;#\s]*)")
REDACTED = "***"


def _redact_userinfo(m: re.Match) -> str:
    user, colon, _ = m["userinfo"].partition(":")
    # "user:password@" keeps the user; a lone "TOKEN@" (GitHub, GitLab tokens) may itself be the secret.
    return f"{m['scheme']}{user}:{REDACTED}@" if colon else f"{m['scheme']}{REDACTED}@"


def redact(value: Any) -> Any:
    """``value`` with the credentials in any URL it holds masked; non-strings are returned as they are.

    Masks ``user:password@`` (keeping the user), a token-only ``TOKEN@``, and the values of
    secret-named query parameters (``?password=``, ``&token=``, ``access_key=``, ``X-Amz-Signature=``,
    ...). Use it on every URI, storage URL or data source before it is logged, shown or stored.
    """
    if not isinstance(value, str):
        return value
    text = _URL_USERINFO.sub(_redact_userinfo, value)
    return _QUERY_PARAM.sub(
        lambda m: f"{m['sep']}{m['name']}={REDACTED}" if SECRET_NAME.search(m["name"]) else m[0], text)


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


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write JSON atomically (temp file + rename), so a crash never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, umask_mode())
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=True, default=str)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


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
        raise Terminated(f"terminated by signal {signum}")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


_PARTIAL_SUFFIX = ".partial"


def _partial_prefix(dest: Path) -> str:
    return f".{dest.name}."


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, another user's
    return True


def remove_stale_partials(dest: str | os.PathLike) -> list[Path]:
    """Remove temporary directories left beside ``dest`` by a killed writer (SIGKILL, power loss).

    A partial is named ``.<dest name>.<host>-<pid>.<random>.partial``; it is stale when it was made
    on this host by a process that no longer runs (or carries no pid: an older m2snet's). A partial
    of a live process (a concurrent writer) is left alone. Returns what was removed.
    """
    dest = Path(dest)
    if not dest.parent.is_dir():
        return []
    prefix, host = _partial_prefix(dest), socket.gethostname()
    tagged = re.compile(rf"^{re.escape(prefix)}(?P<host>.+)-(?P<pid>\d+)\.[^.]+{re.escape(_PARTIAL_SUFFIX)}$")
    removed = []
    for path in dest.parent.iterdir():
        if not (path.name.startswith(prefix) and path.name.endswith(_PARTIAL_SUFFIX) and path.is_dir()):
            continue
        m = tagged.match(path.name)
        if m and (m.group("host") != host or _pid_alive(int(m.group("pid")))):
            continue
        shutil.rmtree(path, ignore_errors=True)
        log.warning("removed %s: a partial output left by a killed run", path)
        removed.append(path)
    return removed


@contextlib.contextmanager
def atomic_directory(dest: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory beside ``dest``; move it to ``dest`` only on success.

    On any exception, Ctrl-C (SIGINT) or SIGTERM the temporary directory is removed and ``dest``
    is left untouched, so a failed import or export never leaves a half-written output behind.
    What a SIGKILL leaves is removed by the next write to the same ``dest``
    (:func:`remove_stale_partials`). The result has the process umask's mode (0755 under 022),
    not mkdtemp's private 0700.
    """
    dest = Path(dest)
    if dest.exists() and not overwrite:
        if not dest.is_dir() or any(dest.iterdir()):
            raise M2SNetError(f"{dest}: already exists and is not empty (use --overwrite to replace it)")
    dest.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(dest)
    with _sigterm_raises():
        tmp = Path(tempfile.mkdtemp(
            dir=dest.parent, prefix=f"{_partial_prefix(dest)}{socket.gethostname()}-{os.getpid()}.",
            suffix=_PARTIAL_SUFFIX,
        ))
        try:
            os.chmod(tmp, umask_mode(directory=True))
            yield tmp
            if dest.exists():
                shutil.rmtree(dest)
            os.replace(tmp, dest)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


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
