"""The one on-disk dataset format every importer writes and every consumer reads.

Layout (nnU-Net-like; documented in docs/data-format.md)::

    DEST/dataset.json         format_version, source_format, n_classes, mask_classes, labels, ...
    DEST/manifest.csv         one row per case (columns: MANIFEST_COLUMNS)
    DEST/images/<case_id>.png 8-bit RGB
    DEST/masks/<case_id>.png  8-bit L: 0/1 for binary sets, class ids 0..n_classes-1 otherwise

``n_classes`` follows the models' convention: 1 means a binary mask (0 background, 1 lesion),
k > 1 means class ids 0..k-1 with 0 = background.

PNG bytes are written with fixed options (no compression level drift, no metadata), so the same
pixels always give the same bytes: the manifest's sha256 is therefore a content identity and the
DVC hash of a regenerated dataset does not move.

The directory holds the data and nothing else, so its DVC hash (the dataset version) is a function
of the data: no name (the name is the directory's), no creator version, no validation report (that
is written beside the directory, like split files).

Format 2 (this one): ``group`` is the duplicate-cluster id (exact + near duplicates, see
m2snet.data.duplicates: the smallest case id of the cluster, a singleton's own id); ``subset`` is
the source's own subset name where a layout has one (PraNet: ``train``, ``CVC-300``, ...).
Format 1 stored the subset in ``group`` and is refused with a request to re-import.

Columns after ``MANIFEST_COLUMNS`` are the grouping a source itself knows, added by its importer
(CVC-ClinicDB: ``sequence``, the video sequence of the frame) or by a user (e.g. ``patient``); they
are kept as read and written back in name order, and ``m2snet data split --group-by COLUMN`` keeps
every value of one on one side of every split (an empty value groups nothing). dataset.json's
``group_by`` names the column the importer knows to be a grouping (CVC-ClinicDB: ``sequence``): every
split uses it unless told otherwise (``--group-by none``).
"""

from __future__ import annotations

import csv
import io
import os
import re
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path, PurePosixPath
from typing import Any, Iterable

from m2snet.errors import M2SNetError
from m2snet.files import atomic_file, read_json, write_json
from m2snet.hashing import sha256_bytes

FORMAT_VERSION = 2
DATASET_JSON = "dataset.json"
MANIFEST_CSV = "manifest.csv"
IMAGES_DIR = "images"
MASKS_DIR = "masks"
BINARY_MASK_CLASSES = ["background", "lesion"]

MANIFEST_COLUMNS = [
    "case_id", "label", "image", "mask", "source_image", "source_masks",
    "height", "width", "sha256", "mask_sha256", "lesion_area", "group", "subset",
]
# Extra (grouping) columns: a name like a Python identifier, so that it is one token on the command line.
_EXTRA_COLUMN_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# Several source masks of one case are joined with this separator in the manifest.
SOURCE_MASKS_SEP = ";"

_CASE_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def safe_case_id(*parts: str) -> str:
    """A filesystem- and URL-safe id from source names: ``("benign", "benign (12)")`` -> ``benign_0012``.

    Runs of unsafe characters become one underscore; purely numeric parts are zero-padded to four
    digits so that ids sort like the source numbering. A part equal to the previous one's prefix
    (BUSI repeats the class in the file name) is not repeated.
    """
    out: list[str] = []
    for part in parts:
        part = str(part)
        if out and part.lower().startswith(out[-1].lower()):
            part = part[len(out[-1]):]
        part = re.sub(r"[^A-Za-z0-9.-]+", "_", part).strip("_.-")
        if not part:
            continue
        if part.isdigit():
            part = f"{int(part):04d}"
        out.append(part)
    case_id = "_".join(out)
    # A lone number in parentheses ("benign (12)") leaves "benign_12": pad the trailing number too.
    case_id = re.sub(r"(?<=_)(\d{1,3})$", lambda m: f"{int(m.group(1)):04d}", case_id)
    if not _CASE_ID_RE.match(case_id):
        raise M2SNetError(f"cannot make a safe case id from {parts!r}")
    return case_id


@dataclass(frozen=True)
class CaseRecord:
    """One image and its mask, as listed in manifest.csv (paths resolved against the dataset root)."""

    case_id: str
    label: str
    image_path: Path
    mask_path: Path
    height: int
    width: int
    sha256: str
    lesion_area: int
    group: str  # duplicate-cluster id: the smallest case_id of its cluster (its own id when unique)
    subset: str = ""  # the source layout's subset (PraNet: train / test set name), else ""
    mask_sha256: str = ""
    source_image: str = ""
    source_masks: tuple[str, ...] = ()
    # Columns beyond MANIFEST_COLUMNS, (name, value) in name order: the source's own grouping.
    extra: tuple[tuple[str, str], ...] = ()

    def column(self, name: str) -> str:
        """The value of manifest column ``name`` (not ``image``/``mask``) as manifest.csv holds it;
        "" for an extra column the case lacks."""
        return str(self._values().get(name, ""))

    def _values(self) -> dict[str, Any]:
        """Every manifest column but the two paths (which are written relative to the dataset root)."""
        return {
            "case_id": self.case_id,
            "label": self.label,
            "source_image": self.source_image,
            "source_masks": SOURCE_MASKS_SEP.join(self.source_masks),
            "height": self.height,
            "width": self.width,
            "sha256": self.sha256,
            "mask_sha256": self.mask_sha256,
            "lesion_area": self.lesion_area,
            "group": self.group,
            "subset": self.subset,
            **dict(self.extra),
        }

    def to_row(self, root: Path) -> dict[str, Any]:
        return {
            "image": self.image_path.relative_to(root).as_posix(),
            "mask": self.mask_path.relative_to(root).as_posix(),
            **self._values(),
        }


@dataclass
class DatasetInfo:
    """A loaded dataset directory: its dataset.json fields and its cases."""

    root: Path
    name: str
    source_format: str
    n_classes: int
    mask_classes: list[str]
    labels: list[str]
    cases: list[CaseRecord]
    meta: dict[str, Any] = field(default_factory=dict)

    @cached_property
    def version(self) -> str:
        """The DVC directory hash of the dataset (``<md5>.dir``), the value ``dvc add`` writes.

        Computed from the files, so it is right whether or not the directory is DVC-tracked
        and a stale .dvc file cannot lie about it.
        """
        from m2snet.data.versioning import dataset_version

        return dataset_version(self.root)

    @property
    def columns(self) -> list[str]:
        """manifest.csv's columns: MANIFEST_COLUMNS, then the extra (grouping) columns in name order."""
        return MANIFEST_COLUMNS + extra_columns(self.cases)

    def case(self, case_id: str) -> CaseRecord:
        try:
            return self._by_id[case_id]
        except KeyError:
            raise M2SNetError(f"{self.root / MANIFEST_CSV}: no case {case_id!r}") from None

    @cached_property
    def _by_id(self) -> dict[str, CaseRecord]:
        return {c.case_id: c for c in self.cases}

    @property
    def group_by(self) -> str | None:
        """The manifest column dataset.json names as the source's grouping (``group_by``, written by the
        importer: CVC-ClinicDB's ``sequence``), or None; splits use it by default (m2snet.data.split)."""
        return self.meta.get("group_by")

    @property
    def is_binary(self) -> bool:
        return self.n_classes == 1


def encode_png(image: "Any") -> bytes:
    """PNG bytes of a PIL image with fixed options, so equal pixels give equal bytes."""
    buf = io.BytesIO()
    # compress_level fixed, optimize off and no pnginfo: zlib output then depends on pixels only.
    image.save(buf, format="PNG", compress_level=6, optimize=False)
    return buf.getvalue()


def write_png(path: Path, image: "Any") -> str:
    """Write ``image`` as PNG at ``path``; return the sha256 of the bytes written."""
    data = encode_png(image)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return sha256_bytes(data)


def extra_columns(cases: Iterable[CaseRecord]) -> list[str]:
    """The extra (grouping) columns of ``cases``, in name order."""
    return sorted({name for case in cases for name, _ in case.extra})


def check_extra_column(name: str, where: str) -> None:
    if name in MANIFEST_COLUMNS or not _EXTRA_COLUMN_RE.match(name):
        raise M2SNetError(f"{where}: {name!r} cannot be an extra manifest column (a new name of letters, digits "
                          "and underscores is needed)")


def write_dataset(
    root: Path,
    cases: Iterable[CaseRecord],
    *,
    source_format: str,
    n_classes: int,
    mask_classes: list[str],
    labels: list[str],
    extra: dict[str, Any] | None = None,
) -> None:
    """Write dataset.json and manifest.csv for cases whose PNGs are already under ``root``.

    Only facts that change what the data means go into dataset.json: it is part of the version.
    """
    cases = sorted(cases, key=lambda c: c.case_id)
    meta: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "source_format": source_format,
        "n_classes": n_classes,
        "mask_classes": list(mask_classes),
        "labels": list(labels),
        "n_cases": len(cases),
    }
    meta.update(extra or {})
    write_json(root / DATASET_JSON, meta)
    with atomic_file(root / MANIFEST_CSV) as tmp, open(tmp, "w", newline="") as f:
        extra = extra_columns(cases)
        for name in extra:
            check_extra_column(name, str(root / MANIFEST_CSV))
        writer = csv.DictWriter(f, fieldnames=MANIFEST_COLUMNS + extra, restval="", lineterminator="\n")
        writer.writeheader()
        for case in cases:
            writer.writerow(case.to_row(root))


def _int(value: str, where: str) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise M2SNetError(f"{where}: expected an integer, got {value!r}") from None


def _dataset_path(root: Path, value: str, where: str, column: str) -> Path:
    """A manifest path (relative, POSIX) under ``root``. An absolute path, or one whose ``..`` parts
    leave the root, is refused: the dataset version hashes the files under the root only, so such a
    file could change without changing the version."""
    normal = PurePosixPath(os.path.normpath(value)) if value else PurePosixPath("")
    if not value or PurePosixPath(value).is_absolute() or normal.parts[:1] == ("..",):
        raise M2SNetError(f"{where}: {column} path {value!r} is absolute or outside the dataset: paths must be "
                          f"relative to the dataset folder and inside it (the version covers only {root})")
    return root / value


def _names(value: Any, where: Path, key: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise M2SNetError(f"{where}: {key} {value!r} must be a list of names")
    return value


def _classes(meta: dict[str, Any], where: Path) -> tuple[int, list[str]]:
    """dataset.json's ``n_classes`` and ``mask_classes``, checked: a wrong type or count here would reach the
    model's head (``n_classes: -3`` once validated as OK) or fail deep inside training."""
    n_classes = meta.get("n_classes", 1)
    # bool is an int to Python, and 1.0 is not a class count anyone writes on purpose.
    if isinstance(n_classes, bool) or not isinstance(n_classes, int) or n_classes < 1:
        raise M2SNetError(f"{where}: n_classes {n_classes!r} must be a whole number >= 1 (1 = a binary mask, "
                          "k > 1 = class ids 0..k-1)")
    mask_classes = _names(meta.get("mask_classes", BINARY_MASK_CLASSES), where, "mask_classes")
    expected = 2 if n_classes == 1 else n_classes  # a binary mask's classes: background and lesion
    if len(mask_classes) != expected:
        raise M2SNetError(f"{where}: {len(mask_classes)} mask_classes {mask_classes} for n_classes {n_classes} "
                          f"(expected {expected} names, one per mask value)")
    return n_classes, mask_classes


def load_dataset(root: str | os.PathLike) -> DatasetInfo:
    """Read a dataset directory written by an importer (or ``m2snet data demo`` + import)."""
    root = Path(root).resolve()
    meta_path, manifest_path = root / DATASET_JSON, root / MANIFEST_CSV
    if not meta_path.is_file():
        raise M2SNetError(
            f"{meta_path}: not found; {root} is not an m2snet dataset "
            "(create one with `m2snet data import` or `m2snet data demo`)"
        )
    meta = read_json(meta_path, "dataset description")
    if not isinstance(meta, dict):
        raise M2SNetError(f"{meta_path}: a dataset description is a JSON object, not a JSON {type(meta).__name__}")
    if meta.get("format_version") == 1:
        raise M2SNetError(
            f"{meta_path}: format_version 1 (written by an older m2snet) is no longer read: format 2 "
            "groups near-duplicate images in the manifest's `group` column; re-import the source with "
            "`m2snet data import` (or regenerate the demo with `m2snet data demo DEST --formatted`)"
        )
    if meta.get("format_version") != FORMAT_VERSION:
        raise M2SNetError(
            f"{meta_path}: format_version {meta.get('format_version')!r} is not supported (expected {FORMAT_VERSION})"
        )
    if not manifest_path.is_file():
        raise M2SNetError(f"{manifest_path}: not found")
    with open(manifest_path, newline="") as f:
        reader = csv.DictReader(f)
        missing = set(MANIFEST_COLUMNS) - set(reader.fieldnames or [])
        if missing:
            raise M2SNetError(f"{manifest_path}: missing columns {sorted(missing)}")
        extra = sorted(set(reader.fieldnames or []) - set(MANIFEST_COLUMNS))
        for name in extra:
            check_extra_column(name, str(manifest_path))
        cases = []
        for lineno, row in enumerate(reader, start=2):
            where = f"{manifest_path}:{lineno}"
            cases.append(
                CaseRecord(
                    case_id=row["case_id"],
                    label=row["label"],
                    image_path=_dataset_path(root, row["image"], where, "image"),
                    mask_path=_dataset_path(root, row["mask"], where, "mask"),
                    height=_int(row["height"], where),
                    width=_int(row["width"], where),
                    sha256=row["sha256"],
                    lesion_area=_int(row["lesion_area"], where),
                    group=row["group"] or row["case_id"],
                    subset=row["subset"],
                    mask_sha256=row["mask_sha256"],
                    source_image=row["source_image"],
                    source_masks=tuple(s for s in row["source_masks"].split(SOURCE_MASKS_SEP) if s),
                    extra=tuple((name, row[name] or "") for name in extra),
                )
            )
    ids = [c.case_id for c in cases]
    if len(set(ids)) != len(ids):
        dup = sorted({i for i in ids if ids.count(i) > 1})
        raise M2SNetError(f"{manifest_path}: duplicate case ids {dup[:5]}")
    known = {"source_format", "n_classes", "mask_classes", "labels"}
    n_classes, mask_classes = _classes(meta, meta_path)
    group_by = meta.get("group_by")
    if group_by is not None and not isinstance(group_by, str):
        raise M2SNetError(f"{meta_path}: group_by {group_by!r} must be a manifest column's name (or absent)")
    if group_by is not None and group_by not in extra:
        raise M2SNetError(f"{meta_path}: group_by {group_by!r} is no such manifest column (extra columns: "
                          f"{', '.join(extra) or 'none'})")
    return DatasetInfo(
        root=root,
        name=root.name,
        source_format=str(meta.get("source_format", "")),
        n_classes=n_classes,
        mask_classes=mask_classes,
        labels=_names(meta.get("labels", sorted({c.label for c in cases})), meta_path, "labels"),
        cases=cases,
        meta={k: v for k, v in meta.items() if k not in known},
    )
