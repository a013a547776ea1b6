"""Polyp sets in their published layouts: Kvasir-SEG and the PraNet benchmark (JPEG masks, thresholded).
CVC-ClinicDB, with its video sequences, has its own module (:mod:`.clinicdb`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from m2snet.data.duplicates import ENDOSCOPY_MAX_DISTANCE
from m2snet.data.format import safe_case_id
from m2snet.data.importers.base import Importer, SourceCase
from m2snet.data.importers.layout import find_dir, pair_by_stem
from m2snet.data.importers.registry import register_importer
from m2snet.errors import M2SNetError


@register_importer("kvasir")
@dataclass
class KvasirImporter(Importer):
    """Kvasir-SEG: ``images/X.jpg`` + ``masks/X.jpg``; JPEG masks thresholded (default > 127)."""

    description: ClassVar[str] = "Kvasir-SEG polyps (images/, masks/, JPEG masks)"
    near_duplicate_threshold: ClassVar[int] = ENDOSCOPY_MAX_DISTANCE
    lesion_labels: ClassVar[list[str]] = ["polyp"]
    threshold: int | None = 127

    def scan(self, src: Path) -> list[SourceCase]:
        pairs = pair_by_stem(find_dir(src, "images"), find_dir(src, "masks"))
        return [SourceCase(safe_case_id(img.stem), "polyp", "", img, m) for img, m in pairs]


@register_importer("pranet")
@dataclass
class PraNetImporter(Importer):
    """PraNet polyp layout: ``TrainDataset/{images,masks}``, ``TestDataset/<name>/{images,masks}``.

    The manifest's ``subset`` is ``train`` or the test subset's name (CVC-300, Kvasir, ...), so
    evaluation can report per subset.
    """

    description: ClassVar[str] = "PraNet polyp benchmark (TrainDataset/, TestDataset/<name>/)"
    near_duplicate_threshold: ClassVar[int] = ENDOSCOPY_MAX_DISTANCE
    lesion_labels: ClassVar[list[str]] = ["polyp"]
    threshold: int | None = 127

    def scan(self, src: Path) -> list[SourceCase]:
        subsets: list[tuple[str, Path]] = []
        if (src / "TrainDataset").is_dir():
            subsets.append(("train", src / "TrainDataset"))
        if (src / "TestDataset").is_dir():
            subsets += [(p.name, p) for p in sorted((src / "TestDataset").iterdir()) if p.is_dir()]
        if not subsets:
            raise M2SNetError(f"{src}: expected TrainDataset/ and/or TestDataset/<name>/ (PraNet layout)")
        cases = []
        for subset, folder in subsets:
            for img, masks in pair_by_stem(find_dir(folder, "images"), find_dir(folder, "masks")):
                cases.append(SourceCase(safe_case_id(subset, img.stem), "polyp", subset, img, masks))
        return cases
