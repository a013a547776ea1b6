"""Finding a source layout's files: the image files of a folder, a sub-folder by one of its usual names,
and each image paired with its mask by file stem. Shared by the converters."""

from __future__ import annotations

from pathlib import Path

from m2snet.errors import M2SNetError

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


def images_in(folder: Path) -> list[Path]:
    return sorted(
        p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTS and not p.name.startswith(".")
    )


def find_dir(src: Path, *names: str) -> Path:
    """The first existing sub-directory of ``src`` among ``names`` (case-insensitive)."""
    if src.is_dir():
        by_lower = {p.name.lower(): p for p in src.iterdir() if p.is_dir()}
        for name in names:
            if name.lower() in by_lower:
                return by_lower[name.lower()]
    raise M2SNetError(f"{src}: expected a sub-directory named one of {list(names)}")


def option_dir(src: Path, name: str | None, what: str) -> Path | None:
    """The folder an ``images_dir``/``masks_dir`` option names (relative to SRC), or None when not given."""
    if name is None:
        return None
    folder = src / name
    if not folder.is_dir():
        raise M2SNetError(f"{folder}: {what} folder not found")
    return folder


def pair_by_stem(images_dir: Path, masks_dir: Path, suffix: str = "") -> list[tuple[Path, list[Path]]]:
    """Each image with the mask of the same stem (+ ``suffix``), any image extension."""
    masks = {p.stem: p for p in images_in(masks_dir)} if masks_dir.is_dir() else {}
    images = [p for p in images_in(images_dir) if not (suffix and p.stem.endswith(suffix))]
    return [(img, [masks[img.stem + suffix]] if img.stem + suffix in masks else []) for img in images]
