"""Result files written atomically (whole or not at all, with the umask's mode) and JSON read with
one-line errors.

Keep this module free of heavy imports (torch, mlflow, ...): the CLI imports it at start-up.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

from m2snet.errors import M2SNetError
from m2snet.signals import sigterm_raises


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


def cannot_write(path: Path, err: OSError) -> M2SNetError:
    """One line for an OSError met creating ``path`` or its folder (read-only, under a file, /proc)."""
    reason = "not a directory" if isinstance(err, (FileExistsError, NotADirectoryError)) else err.strerror or str(err)
    where = f": {err.filename}" if err.filename and str(err.filename) != str(path) else ""
    return M2SNetError(f"{path}: cannot write there ({reason}{where})")


def make_parent(path: Path) -> None:
    """Create ``path``'s folder; a folder that cannot be made (read-only, under a file, /proc) is a user error."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise cannot_write(path, err) from None


def fsync_directory(path: Path) -> None:
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
    make_parent(path)
    with sigterm_raises():
        try:
            fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        except OSError as err:
            raise cannot_write(path, err) from None
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
    fsync_directory(path.parent)


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
