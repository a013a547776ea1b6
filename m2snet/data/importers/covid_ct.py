"""COVID-19 CT infection slices in the Inf-Net layout."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from m2snet.data.format import safe_case_id
from m2snet.data.importers.base import Importer, SourceCase
from m2snet.data.importers.layout import find_dir, pair_by_stem
from m2snet.data.importers.registry import register_importer
from m2snet.errors import M2SNetError


@register_importer("covid-ct")
@dataclass
class CovidCtImporter(Importer):
    """COVID-19 CT infection slices (Inf-Net layout): ``Imgs/X.jpg`` + ``GT/X.png``.

    The published training set nests them one level down,
    ``TrainingSet/LungInfection-Train/Doctor-label/{Imgs,GT}``: a ``Doctor-label/`` folder is entered
    when SRC has one (the ``Pseudo-label/`` sibling holds machine labels and is not read).
    Slices without infection are legitimate, so no lesion is required.
    """

    description: ClassVar[str] = "COVID-19 CT infection slices (Imgs/, GT/; or Doctor-label/{Imgs,GT})"
    threshold: int | None = 127

    def scan(self, src: Path) -> list[SourceCase]:
        root = src / "Doctor-label" if (src / "Doctor-label").is_dir() else src
        try:
            images, masks = find_dir(root, "Imgs", "images"), find_dir(root, "GT", "masks")
        except M2SNetError:
            raise M2SNetError(
                f"{src}: expected Imgs/ and GT/ (Inf-Net COVID-SemiSeg layout), or Doctor-label/Imgs and "
                "Doctor-label/GT as in the published TrainingSet/LungInfection-Train/Doctor-label/; point SRC "
                "at the folder that holds them"
            ) from None
        pairs = pair_by_stem(images, masks)
        return [SourceCase(safe_case_id(img.stem), "ct", "", img, m) for img, m in pairs]
