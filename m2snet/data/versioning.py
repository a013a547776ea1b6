"""Dataset versions for lineage: the DVC directory hash, computed the way DVC computes it.

``dataset_version(root)`` returns the value ``dvc add root`` records in its .dvc file
(``<md5 of the sorted JSON listing>.dir``), computed directly from the files. Training records it
with every run, so a run can be traced to the exact bytes it trained on, and the value can be
compared with ``data.dvc`` (see ``tracked_version``) to tell whether the working copy matches.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import yaml

from m2snet.errors import M2SNetError

# Directories DVC itself never descends into (dvc/ignore.py: DvcIgnoreFilter defaults).
_DVC_SKIP_DIRS = {".git", ".hg", ".dvc"}


def _md5_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def dir_listing(root: str | os.PathLike) -> list[dict[str, str]]:
    """DVC's ``.dir`` object for a directory: ``[{"md5": ..., "relpath": ...}]`` sorted by path."""
    root = Path(root)
    entries = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _DVC_SKIP_DIRS)
        for name in filenames:
            path = Path(dirpath) / name
            entries.append({"md5": _md5_file(path), "relpath": path.relative_to(root).as_posix()})
    return sorted(entries, key=lambda e: e["relpath"])


def dataset_version(root: str | os.PathLike) -> str:
    """The DVC directory hash of ``root`` (e.g. ``'3f2a...e1.dir'``), equal to what ``dvc add`` writes."""
    root = Path(root)
    if not root.is_dir():
        raise M2SNetError(f"{root}: not a directory")
    # Same bytes as dvc_data.hashfile.tree.Tree.as_bytes(): json.dumps(..., sort_keys=True).
    listing = json.dumps(dir_listing(root), sort_keys=True).encode("utf-8")
    return hashlib.md5(listing).hexdigest() + ".dir"


def find_dvc_file(root: str | os.PathLike) -> Path | None:
    """The .dvc file that tracks ``root`` (``<root>.dvc`` or a .dvc file in a parent whose out is root)."""
    root = Path(root).resolve()
    sibling = root.with_name(root.name + ".dvc")
    candidates = [sibling] if sibling.is_file() else []
    for parent in root.parents:
        candidates += sorted(p for p in parent.glob("*.dvc") if p.is_file() and p != sibling)
        if (parent / ".dvc").is_dir() or (parent / ".git").exists():
            break
    for dvc_file in candidates:
        try:
            outs = (yaml.safe_load(dvc_file.read_text()) or {}).get("outs", [])
        except yaml.YAMLError:
            continue
        for out in outs:
            if (dvc_file.parent / out.get("path", "")).resolve() == root:
                return dvc_file
    return None


def tracked_version(root: str | os.PathLike) -> str | None:
    """The hash recorded for ``root`` in its .dvc file, or None when it is not DVC-tracked."""
    dvc_file = find_dvc_file(root)
    if dvc_file is None:
        return None
    root = Path(root).resolve()
    for out in (yaml.safe_load(dvc_file.read_text()) or {}).get("outs", []):
        if (dvc_file.parent / out.get("path", "")).resolve() == root:
            return out.get("md5")
    return None
