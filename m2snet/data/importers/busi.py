"""BUSI breast ultrasound: class folders, each image beside its masks (``X.png`` + ``X_mask[_N].png``)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from m2snet.data.format import safe_case_id
from m2snet.data.importers.base import Importer, SourceCase
from m2snet.data.importers.layout import images_in
from m2snet.data.importers.registry import register_importer
from m2snet.errors import M2SNetError


@register_importer("busi")
@dataclass
class BusiImporter(Importer):
    """BUSI as distributed: ``{benign,malignant,normal}/X.png`` + ``X_mask.png`` [+ ``X_mask_1.png`` ...].

    Several masks of one image are merged by union. Masks come as 1-bit, RGB and RGBA (alpha ignored).
    BUSI holds exact-duplicate images, some under two labels (Pawlowska et al. 2023), so duplicates
    and label conflicts are allowed by default: recorded, reported as warnings, kept in one fold.
    """

    description: ClassVar[str] = "BUSI breast ultrasound (benign/ malignant/ normal/, X_mask.png)"
    lesion_labels: ClassVar[list[str]] = ["benign", "malignant"]
    empty_labels: ClassVar[list[str]] = ["normal"]
    allow_duplicates_default: ClassVar[bool] = True
    allow_label_conflicts_default: ClassVar[bool] = True
    classes: tuple[str, ...] = ("benign", "malignant", "normal")

    def scan(self, src: Path) -> list[SourceCase]:
        present = [c for c in self.classes if (src / c).is_dir()]
        if not present:
            raise M2SNetError(f"{src}: no BUSI class folders found (expected {', '.join(self.classes)})")
        cases = []
        mask_re = re.compile(r"^(?P<stem>.+)_mask(_\d+)?$")
        for label in present:
            files = images_in(src / label)
            masks: dict[str, list[Path]] = {}
            images = []
            for p in files:
                m = mask_re.match(p.stem)
                if m:
                    masks.setdefault(m.group("stem"), []).append(p)
                else:
                    images.append(p)
            for img in images:
                cases.append(SourceCase(safe_case_id(label, img.stem), label, "", img, sorted(masks.pop(img.stem, []))))
            for stem, orphan in masks.items():
                raise M2SNetError(f"{orphan[0]}: mask without an image (expected {src / label / (stem + '.png')})")
        return cases
