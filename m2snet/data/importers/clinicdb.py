"""CVC-ClinicDB: frames of 29 colonoscopy videos, each frame's sequence recorded from the source's table."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from m2snet.data.duplicates import ENDOSCOPY_MAX_DISTANCE
from m2snet.data.format import safe_case_id
from m2snet.data.importers.base import Importer, SourceCase
from m2snet.data.importers.layout import find_dir, option_dir, pair_by_stem
from m2snet.data.importers.registry import register_importer

# CVC-ClinicDB's README, transcribed: the first and last frame of each of its 29 video sequences
# (1-based, contiguous, 1..612). The frames of a sequence show one polyp from several points of
# view, so a split keeps a sequence on one side (tests/test_data_clinicdb.py checks the table).
CLINICDB_SEQUENCES: tuple[tuple[int, int], ...] = (
    (1, 25), (26, 50), (51, 67), (68, 78), (79, 103), (104, 126), (127, 151), (152, 177), (178, 199),
    (200, 205), (206, 227), (228, 252), (253, 277), (278, 297), (298, 317), (318, 342), (343, 363),
    (364, 383), (384, 408), (409, 428), (429, 447), (448, 466), (467, 478), (479, 503), (504, 528),
    (529, 546), (547, 571), (572, 591), (592, 612),
)


def clinicdb_sequence(frame: int) -> int | None:
    """The CVC-ClinicDB video sequence (1..29) of frame number ``frame`` (1..612), or None."""
    for k, (first, last) in enumerate(CLINICDB_SEQUENCES, start=1):
        if first <= frame <= last:
            return k
    return None


@register_importer("cvc-clinicdb")
@dataclass
class ClinicDbImporter(Importer):
    """CVC-ClinicDB: ``Original/N.tif`` + ``Ground Truth/N.tif`` (TIFF, or the PNG re-release).

    The manifest's ``sequence`` column is frame N's video sequence from the source's table
    (:data:`CLINICDB_SEQUENCES`; empty for a file not named by a frame number 1..612); dataset.json
    names it as the dataset's ``group_by``, so that ``m2snet data split`` keeps each sequence on one
    side unless told ``--group-by none``. ``images_dir`` /
    ``masks_dir`` (relative to SRC) name the folders when they are not the usual ones, e.g. on a
    copy that has them swapped.
    """

    description: ClassVar[str] = "CVC-ClinicDB polyps (Original/, Ground Truth/, TIFF; options images_dir, masks_dir)"
    near_duplicate_threshold: ClassVar[int] = ENDOSCOPY_MAX_DISTANCE
    lesion_labels: ClassVar[list[str]] = ["polyp"]
    group_by: ClassVar[str | None] = "sequence"
    threshold: int | None = 127
    images_dir: str | None = None
    masks_dir: str | None = None

    def scan(self, src: Path) -> list[SourceCase]:
        root = src / "PNG" if (src / "PNG").is_dir() and not (src / "Original").is_dir() else src
        images = option_dir(src, self.images_dir, "images") or find_dir(root, "Original", "images")
        masks = (option_dir(src, self.masks_dir, "masks")
                 or find_dir(root, "Ground Truth", "GroundTruth", "masks"))
        cases = []
        for img, m in pair_by_stem(images, masks):
            sequence = clinicdb_sequence(int(img.stem)) if img.stem.isdigit() else None
            extra = {"sequence": "" if sequence is None else str(sequence)}
            cases.append(SourceCase(safe_case_id("clinicdb", img.stem), "polyp", "", img, m, extra))
        return cases
