"""The input preprocessing a model was trained with, kept with the model (as timm keeps mean/std).

The data pipeline does not decide the normalisation: the trainer and evaluation take it from the
model / checkpoint and hand it to the dataset, so a checkpoint is always fed what it was trained on.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

RGB = tuple[float, float, float]


@dataclass(frozen=True)
class Normalization:
    """Per-channel ``(x - mean) / std`` on 0..255 RGB."""

    mean: RGB
    std: RGB

    def to_dict(self) -> dict[str, list[float]]:
        """The checkpoint / ONNX-metadata form: ``{"mean": [r, g, b], "std": [r, g, b]}``."""
        return {"mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_dict(cls, value: Mapping[str, Any] | None) -> Normalization:
        """The checkpoint form back (None: :data:`DEFAULT_NORMALIZATION`, as for checkpoints without one)."""
        if not value:
            return DEFAULT_NORMALIZATION
        return cls(mean=tuple(float(v) for v in value["mean"]), std=tuple(float(v) for v in value["std"]))


# The reference code's normalisation (spec: "Training recipe"); every registered model uses it.
DEFAULT_NORMALIZATION = Normalization(mean=(124.55, 118.90, 102.94), std=(56.77, 55.97, 57.50))
