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
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any, Iterator

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


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write JSON atomically (temp file + rename), so a crash never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=True, default=str)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_directory(dest: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory beside ``dest``; move it to ``dest`` only on success.

    On any exception the temporary directory is removed and ``dest`` is left untouched,
    so a failed import or export never leaves a half-written output behind.
    """
    dest = Path(dest)
    if dest.exists() and not overwrite:
        if not dest.is_dir() or any(dest.iterdir()):
            raise M2SNetError(f"{dest}: already exists and is not empty (use --overwrite to replace it)")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".partial"))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if dest.exists():
        shutil.rmtree(dest)
    os.replace(tmp, dest)


def git_commit(cwd: str | os.PathLike | None = None) -> str:
    """The code version: the git commit (with '+dirty' for local changes), else the package version."""
    from m2snet import __version__

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
    import socket

    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def interpreter_bin() -> Path:
    """The bin directory of the running interpreter (a virtualenv's, when m2snet runs from one)."""
    import sys

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
