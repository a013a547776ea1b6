"""Preprocessed cache: every case decoded and resized once per (dataset version, size).

Layout: ``<cache_dir>/<dataset version>/<size>/{images.npy, masks.npy, index.json}`` with
``images.npy`` uint8 [N, S, S, 3] and ``masks.npy`` uint8 [N, S, S], opened memory-mapped so
DataLoader workers share the pages instead of each holding a copy. Keyed by the dataset's DVC
hash, so an edited dataset can never be served stale arrays. Built in a temporary directory and
renamed into place (m2snet.directories.atomic_directory, shared): a crash mid-build leaves no half cache,
and of processes building the same cache at once (parallel folds) the first to finish wins: the
others discard their copy and use it; a finished cache is never removed or replaced.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
from PIL import Image

from m2snet.data.format import DatasetInfo, load_dataset
from m2snet.data.images import read_image
from m2snet.directories import atomic_directory
from m2snet.errors import M2SNetError
from m2snet.progress import bar as progress_bar

log = logging.getLogger(__name__)


def load_case_arrays(image_path: Path, mask_path: Path, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Decode one case and resize it to ``size`` x ``size``: uint8 [S, S, 3] image, uint8 [S, S] mask.

    Images are resized bilinearly, masks with nearest neighbour so class ids stay class ids.
    This is the one decode+resize; the cache stores exactly its output.
    """
    image = read_image(image_path, "image").convert("RGB").resize((size, size), Image.BILINEAR)
    mask = read_image(mask_path, "mask").convert("L").resize((size, size), Image.NEAREST)
    return np.array(image, dtype=np.uint8), np.array(mask, dtype=np.uint8)


def default_cache_dir() -> Path:
    return Path(os.environ.get("M2SNET_CACHE_DIR", Path.home() / ".cache" / "m2snet"))


class ArrayCache:
    """Read side of a built cache."""

    def __init__(self, path: Path) -> None:
        self.path = path
        index = json.loads((path / "index.json").read_text())
        self.case_ids: list[str] = index["case_ids"]
        self._row = {cid: i for i, cid in enumerate(self.case_ids)}
        self.images = np.load(path / "images.npy", mmap_mode="r")
        self.masks = np.load(path / "masks.npy", mmap_mode="r")

    def get(self, case_id: str) -> tuple[np.ndarray, np.ndarray]:
        try:
            row = self._row[case_id]
        except KeyError:
            raise M2SNetError(f"{self.path}: case {case_id!r} is not in the cache") from None
        return np.array(self.images[row]), np.array(self.masks[row])


def cache_path(info: DatasetInfo, size: int, cache_dir: str | os.PathLike | None = None) -> Path:
    base = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return base / info.version / str(int(size))


def build_cache(info: DatasetInfo, size: int, cache_dir: str | os.PathLike | None = None,
                progress: bool = True) -> Path:
    """Decode and resize every case of ``info`` into the cache (no-op when already built)."""


    path = cache_path(info, size, cache_dir)
    if (path / "index.json").is_file():
        return path
    n = len(info.cases)
    # shared: parallel folds may build the same cache; the first to finish wins and the others use
    # it (replacing it would pull the files from under a fold already reading them).
    with atomic_directory(path, shared=True) as tmp:
        images = np.lib.format.open_memmap(tmp / "images.npy", mode="w+", dtype=np.uint8, shape=(n, size, size, 3))
        masks = np.lib.format.open_memmap(tmp / "masks.npy", mode="w+", dtype=np.uint8, shape=(n, size, size))
        for i, case in enumerate(progress_bar(info.cases, desc=f"cache {size}px", disable=not progress, leave=False)):
            images[i], masks[i] = load_case_arrays(case.image_path, case.mask_path, size)
        images.flush()
        masks.flush()
        del images, masks
        # index.json last: its presence is what marks a cache complete.
        (tmp / "index.json").write_text(
            json.dumps({"case_ids": [c.case_id for c in info.cases], "size": size, "version": info.version})
        )
    if not (path / "index.json").is_file():
        raise M2SNetError(f"{path}: exists but is not a complete m2snet cache (no index.json); remove it")
    log.info("cached %d cases at %d px in %s", n, size, path)
    return path


def open_cache(root: str | os.PathLike | DatasetInfo, size: int,
               cache_dir: str | os.PathLike | None = None) -> ArrayCache:
    """Open the cache for (dataset, size), building it first if needed."""
    info = root if isinstance(root, DatasetInfo) else load_dataset(root)
    return ArrayCache(build_cache(info, size, cache_dir))
