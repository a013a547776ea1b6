"""The torch Dataset the trainer and evaluator read: resized, optionally augmented, normalised."""

from __future__ import annotations

import os
from typing import Any, Protocol, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from m2snet.data.cache import load_case_arrays, open_cache
from m2snet.data.format import DatasetInfo, load_dataset

MAX_ROTATION_DEG = 10.0


class Normalization(Protocol):
    """Per-channel mean/std on 0..255 RGB. The model owns it (m2snet.models.preprocessing); the caller
    passes the model's, so the data layer neither defines nor imports one."""

    mean: Sequence[float]
    std: Sequence[float]


def normalise(image_u8: torch.Tensor, normalization: Normalization) -> torch.Tensor:
    """uint8 [3, H, W] -> float [3, H, W] with the given mean/std."""
    mean = torch.tensor(normalization.mean, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(normalization.std, dtype=torch.float32).view(3, 1, 1)
    return (image_u8.float() - mean) / std


def augment_pair(image: torch.Tensor, mask: torch.Tensor,
                 generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Random horizontal flip and rotation within +-10 degrees (paper 4.3), same for image and mask.

    ``image`` uint8 [3, H, W], ``mask`` uint8 [1, H, W]; the mask is rotated with nearest neighbour.
    Uses torch's RNG so DataLoader workers (seeded by torch) get independent streams.
    """
    from torchvision.transforms.v2 import InterpolationMode
    from torchvision.transforms.v2 import functional as F

    if torch.rand((), generator=generator) < 0.5:
        image, mask = image.flip(-1), mask.flip(-1)
    angle = float((torch.rand((), generator=generator) * 2 - 1) * MAX_ROTATION_DEG)
    image = F.rotate(image, angle, interpolation=InterpolationMode.BILINEAR, fill=0)
    mask = F.rotate(mask, angle, interpolation=InterpolationMode.NEAREST, fill=0)
    return image, mask


class SegmentationDataset(Dataset):
    """Cases of a dataset directory, as ``{"image", "mask", "case_id"}`` dicts.

    - ``image``: float [3, size, size], normalised with ``normalization`` (the model's).
    - ``mask``: float [1, size, size] in {0, 1} for a binary set (n_classes == 1);
      long [size, size] class ids otherwise.
    - ``cache_dir``: when given, decoded and resized arrays come from a memory-mapped cache
      (built once per dataset version and size, see m2snet.data.cache), so epochs skip PNG decoding.
    """

    def __init__(
        self,
        root: str | os.PathLike | DatasetInfo,
        case_ids: Sequence[str] | None,
        size: int,
        augment: bool = False,
        cache_dir: str | os.PathLike | None = None,
        *,
        normalization: Normalization,
    ) -> None:
        self.info = root if isinstance(root, DatasetInfo) else load_dataset(root)
        self.case_ids = list(case_ids) if case_ids is not None else [c.case_id for c in self.info.cases]
        self.cases = [self.info.case(cid) for cid in self.case_ids]
        self.size = int(size)
        self.augment = augment
        self.normalization = normalization
        self.binary = self.info.is_binary
        self._cache = None
        if cache_dir is not None:
            self._cache = open_cache(self.info, self.size, cache_dir)

    def __len__(self) -> int:
        return len(self.cases)

    def arrays(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """The uint8 resized arrays of one case (from the cache when there is one)."""
        case = self.cases[index]
        if self._cache is not None:
            return self._cache.get(case.case_id)
        return load_case_arrays(case.image_path, case.mask_path, self.size)

    def __getitem__(self, index: int) -> dict[str, Any]:
        image_np, mask_np = self.arrays(index)
        image = torch.from_numpy(np.ascontiguousarray(image_np)).permute(2, 0, 1)
        mask = torch.from_numpy(np.ascontiguousarray(mask_np)).unsqueeze(0)
        if self.augment:
            image, mask = augment_pair(image, mask)
        out_mask = (mask > 0).float() if self.binary else mask[0].long()
        return {"image": normalise(image, self.normalization), "mask": out_mask, "case_id": self.cases[index].case_id}
