"""GOALS 2022 OCT layer masks: four classes from fixed grey levels."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np

from m2snet.data.format import safe_case_id
from m2snet.data.importers.base import Importer, SourceCase
from m2snet.data.importers.layout import find_dir, pair_by_stem
from m2snet.data.importers.registry import register_importer
from m2snet.errors import M2SNetError

# GOALS 2022 layer masks: grey level -> (class id, name). Class 0 is background, as everywhere in
# m2snet; the three layers the challenge scores are 1..3.
GOALS_LEVELS = {255: (0, "background"), 0: (1, "RNFL"), 80: (2, "GCIPL"), 160: (3, "choroid")}


@register_importer("goals")
@dataclass
class GoalsImporter(Importer):
    """GOALS 2022 OCT: ``Image/N.png`` + ``Layer_Masks/N.png`` (optionally under ``Train/``).

    Grey levels map to classes: 255 -> 0 background, 0 -> 1 RNFL, 80 -> 2 GCIPL, 160 -> 3 choroid.
    Any other level is an error naming the file.
    """

    description: ClassVar[str] = "GOALS 2022 OCT layers (Image/, Layer_Masks/; 4 classes)"
    n_classes: ClassVar[int] = 4
    mask_classes: ClassVar[list[str]] = [GOALS_LEVELS[k][1] for k in (255, 0, 80, 160)]

    def scan(self, src: Path) -> list[SourceCase]:
        root = src / "Train" if (src / "Train").is_dir() else src
        pairs = pair_by_stem(find_dir(root, "Image", "images"), find_dir(root, "Layer_Masks", "masks"))
        return [SourceCase(safe_case_id("goals", img.stem), "oct", "", img, m) for img, m in pairs]

    def mask_to_classes(self, mask: np.ndarray, path: Path) -> np.ndarray:
        lut = np.full(256, 255, dtype=np.uint8)
        for level, (cls, _) in GOALS_LEVELS.items():
            lut[level] = cls
        out = lut[mask]
        if (out == 255).any():
            bad = sorted(set(np.unique(mask).tolist()) - set(GOALS_LEVELS))
            raise M2SNetError(
                f"{path}: layer mask has grey levels {bad[:8]} outside the GOALS levels {sorted(GOALS_LEVELS)}"
            )
        return out
