"""One writer per output at a time: a ``flock`` on ``.<name>.lock`` beside it."""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
from pathlib import Path
from typing import Iterator

from m2snet.errors import M2SNetError
from m2snet.files import cannot_write, umask_mode

# Beside DEST, named after it, as the partial copies of m2snet.directories.atomic_directory.
_LOCK_SUFFIX = "lock"


def _partial_prefix(dest: Path) -> str:
    return f".{dest.name}."


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
            raise cannot_write(dest, err) from None
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
