"""What every converter is: a :class:`SourceCase` per case found, and an :class:`Importer` that scans a
layout and maps its masks to class ids (the binary default here; GOALS overrides it)."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from m2snet.data.duplicates import DEFAULT_MAX_DISTANCE
from m2snet.data.format import BINARY_MASK_CLASSES
from m2snet.errors import M2SNetError


@dataclass
class SourceCase:
    """One case as found in a source layout."""

    case_id: str
    label: str
    subset: str
    image: Path
    masks: list[Path]
    # The grouping the source itself defines (CVC-ClinicDB: {"sequence": "7"}): extra manifest columns.
    extra: dict[str, str] = field(default_factory=dict)


@dataclass
class Importer:
    """Base importer for binary masks. Subclasses set ``name``/``description`` and implement ``scan``.

    ``threshold``: None = the mask must already be binary (exactly two levels, 0 and one other);
    a number = pixels above it are lesion (for JPEG masks, whose edges carry compression noise).
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    n_classes: ClassVar[int] = 1
    mask_classes: ClassVar[list[str]] = BINARY_MASK_CLASSES
    # Labels whose cases must contain a lesion / must not; checked by validation.
    lesion_labels: ClassVar[list[str]] = []
    empty_labels: ClassVar[list[str]] = []
    allow_duplicates_default: ClassVar[bool] = False
    # Cases of one duplicate cluster under different labels: an error unless the set is known for it.
    allow_label_conflicts_default: ClassVar[bool] = False
    # Near-duplicate threshold (bits) when the import is not given one: where the modality's
    # unrelated images start (see m2snet.data.duplicates).
    near_duplicate_threshold: ClassVar[int] = DEFAULT_MAX_DISTANCE
    # The extra manifest column (SourceCase.extra) whose values the source says belong together (CVC-ClinicDB:
    # ``sequence``, the video of a frame): recorded in dataset.json as ``group_by``, every split's default.
    group_by: ClassVar[str | None] = None

    threshold: int | None = None

    def scan(self, src: Path) -> list[SourceCase]:
        raise NotImplementedError

    def mask_to_classes(self, mask: np.ndarray, path: Path) -> np.ndarray:
        """Grey mask (uint8 [H, W]) -> class ids (uint8 [H, W]); raise M2SNetError on invalid values."""
        if self.threshold is not None:
            return (mask > self.threshold).astype(np.uint8)
        values = np.unique(mask)
        if len(values) > 2 or (len(values) == 2 and values[0] != 0):
            shown = ", ".join(str(v) for v in values[:8]) + (" ..." if len(values) > 8 else "")
            raise M2SNetError(
                f"{path}: mask is not binary (values {shown}); expected 0 and one lesion value "
                "(pass a threshold for JPEG-compressed masks)"
            )
        return (mask > 0).astype(np.uint8)

    def options(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}
