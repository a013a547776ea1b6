"""A generic pair of folders, for a source with no converter of its own."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from m2snet.data.format import safe_case_id
from m2snet.data.importers.base import Importer, SourceCase
from m2snet.data.importers.layout import option_dir, pair_by_stem
from m2snet.data.importers.registry import register_importer


@register_importer("folder")
@dataclass
class FolderImporter(Importer):
    """A generic pair of folders: ``<images_dir>/X.ext`` + ``<masks_dir>/X<mask_suffix>.ext``."""

    description: ClassVar[str] = (
        "generic images/ + masks/ folders (options: images_dir, masks_dir, mask_suffix, threshold, label)"
    )
    images_dir: str = "images"
    masks_dir: str = "masks"
    mask_suffix: str = ""
    label: str = "lesion"
    threshold: int | None = None

    def scan(self, src: Path) -> list[SourceCase]:
        images, masks = option_dir(src, self.images_dir, "images"), src / self.masks_dir
        pairs = pair_by_stem(images, masks, self.mask_suffix)
        return [SourceCase(safe_case_id(img.stem), self.label, "", img, m) for img, m in pairs]
