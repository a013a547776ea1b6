"""Output directories written atomically: built beside DEST, renamed (or swapped) into place, what a
killed writer left cleaned up by the next one."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import logging
import os
import re
import shutil
import signal
import socket
import tempfile
from pathlib import Path
from typing import Any, Iterator

from m2snet.errors import M2SNetError
from m2snet.files import cannot_write, fsync_directory, make_parent, umask_mode
from m2snet.locks import writer_lock
from m2snet.processes import pid_alive
from m2snet.signals import sigterm_raises

log = logging.getLogger("m2snet")


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


def _partial_prefix(dest: Path) -> str:
    return f".{dest.name}."


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
    make_parent(dest)
    with sigterm_raises(), (contextlib.nullcontext() if shared else writer_lock(dest)):
        if not shared:
            _check_destination(dest, overwrite, marker)
        remove_stale_partials(dest)
        try:
            tmp = Path(tempfile.mkdtemp(
                dir=dest.parent, prefix=f"{_partial_prefix(dest)}{socket.gethostname()}-{os.getpid()}.",
                suffix=_PARTIAL_SUFFIX,
            ))
        except OSError as err:
            raise cannot_write(dest, err) from None
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
        fsync_directory(dest.parent)
