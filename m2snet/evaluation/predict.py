"""Inference shared by evaluation and the MLflow pyfunc model.

A :class:`Predictor` holds one or more models (an ensemble, e.g. the folds of a CV) trained at
the same input size and normalisation. It resizes each image to the model's square input size,
averages the models' probabilities (and the horizontally flipped pass with ``tta_flip``), and
resizes the probability map back to each image's original size before any thresholding, as
the paper scores predictions at the original resolution.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from m2snet.data.images import to_8bit
from m2snet.errors import M2SNetError
from m2snet.models.checkpoint import Checkpoint
from m2snet.models.preprocessing import Normalization


def to_rgb_array(image) -> np.ndarray:
    """A PIL image / array (grey, RGB or RGBA; any bit depth) as uint8 [H, W, 3].

    Bit depth goes through the one decoder's rules (m2snet.data.images.to_8bit): a 16-bit picture is
    scaled, never clipped to white.
    """
    rgb = np.asarray(to_8bit(image, "image", "image").convert("RGB"))
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise M2SNetError(f"image of shape {rgb.shape}: expected [H, W], [H, W, 3] or [H, W, 4]")
    return rgb


class Predictor:
    def __init__(self, models: Sequence[torch.nn.Module], meta: dict, device: str = "cpu",
                 tta_flip: bool = False, batch_size: int = 8):
        if not models:
            raise ValueError("Predictor needs at least one model")
        self.models = [m.to(device).eval() for m in models]
        self.meta = meta
        self.device = device
        self.size = int(meta["image_size"])
        self.n_classes = int(meta.get("n_classes", 1))
        norm = Normalization.from_dict(meta.get("normalization"))
        self.mean = torch.tensor(norm.mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(norm.std, dtype=torch.float32).view(1, 3, 1, 1)
        self.tta_flip = tta_flip
        self.batch_size = batch_size
        self.guard = None  # an InputGuard (m2snet.evaluation.guard): set by attach_guard
        self._taps: list = []

    # Whether this predictor can score an input guard (an ONNX file exported before the guard's feature
    # outputs cannot).
    guardable = True

    def attach_guard(self, guard) -> None:
        """Score every image against ``guard`` from the features of the prediction's own forward pass."""
        if len(guard.members) != len(self.models):
            raise M2SNetError(f"input guard has {len(guard.members)} members for an ensemble of {len(self.models)}")
        self.guard = guard
        self.tap_features(guard.levels)

    def tap_features(self, levels: Sequence[int], *, as_tensor: bool = False) -> list:
        """Capture each model's pooled encoder features (``levels``) from the unflipped pass of
        :meth:`ensemble_probs` from now on: the guard's scores, and the ONNX export's feature outputs."""
        from m2snet.evaluation.guard import FeatureTap

        for tap in self._taps:
            tap.close()
        self._taps = [FeatureTap(m, levels, as_tensor=as_tensor) for m in self.models]
        return self._taps

    @classmethod
    def from_checkpoints(cls, paths: Sequence[str | os.PathLike], device: str = "cpu",
                         tta_flip: bool = False, batch_size: int = 8) -> "Predictor":
        models, metas = [], []
        for p in paths:
            ckpt = Checkpoint.load(p)
            models.append(ckpt.build_model(device=device))
            metas.append(ckpt.meta())
        first = metas[0]
        for p, meta in zip(paths, metas):
            for key in ("image_size", "n_classes", "normalization"):
                if meta.get(key) != first.get(key):
                    raise M2SNetError(
                        f"{Path(p)}: {key}={meta.get(key)!r} differs from {Path(paths[0])} "
                        f"({first.get(key)!r}); an ensemble needs the same {key}"
                    )
        return cls(models, first, device=device, tta_flip=tta_flip, batch_size=batch_size)

    def _batch_tensor(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        from PIL import Image

        # Resize exactly as the training data pipeline does (PIL bilinear on the uint8 image).
        resized = [np.array(Image.fromarray(im).resize((self.size, self.size), Image.BILINEAR))
                   for im in images]
        x = torch.stack([torch.from_numpy(np.ascontiguousarray(im)).permute(2, 0, 1) for im in resized]).float()
        return ((x - self.mean) / self.std).to(self.device)

    def _probs(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(logits) if self.n_classes == 1 else torch.softmax(logits, dim=1)

    def ensemble_probs(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised [N, 3, S, S] -> the models' mean probabilities [N, C, S, S] (what ONNX exports)."""
        prob = torch.zeros((x.shape[0], self.n_classes, self.size, self.size), device=x.device)
        passes = 0
        for i, model in enumerate(self.models):
            if self._taps:  # the guard's features come from this (unflipped) pass
                self._taps[i].armed = True
            try:
                prob += self._probs(model(x).float())
            finally:
                if self._taps:
                    self._taps[i].armed = False
            passes += 1
            if self.tta_flip:
                prob += self._probs(model(torch.flip(x, dims=[3])).float()).flip(dims=[3])
                passes += 1
        return prob / passes

    @torch.no_grad()
    def predict_proba(self, images: Sequence) -> list[np.ndarray]:
        """Probabilities at each image's original size: [H, W] (binary) or [C, H, W]."""
        arrays = [to_rgb_array(im) for im in images]
        out: list[np.ndarray] = []
        for start in range(0, len(arrays), self.batch_size):
            chunk = arrays[start:start + self.batch_size]
            # Images of different sizes are resized to one square size, so they batch together.
            prob = self.ensemble_probs(self._batch_tensor(chunk))
            for p, im in zip(prob, chunk):
                h, w = im.shape[:2]
                p = F.interpolate(p[None], size=(h, w), mode="bilinear", align_corners=False)[0]
                p = p.cpu().numpy()
                out.append(p[0] if self.n_classes == 1 else p)
        return out

    def predict_guarded(self, images: Sequence) -> tuple[list[np.ndarray], np.ndarray]:
        """Probabilities (as :meth:`predict_proba`) and each image's out-of-distribution score from the
        attached guard (> 1: flagged); the scores come from the same forward passes."""
        if self.guard is None:
            raise M2SNetError("no input guard attached to this predictor")
        for tap in self._taps:
            tap.take()
        probs = self.predict_proba(images)
        return probs, self.guard.scores([tap.take() for tap in self._taps])

    def to_mask(self, prob: np.ndarray, threshold: float = 0.5) -> np.ndarray:
        """Binary: 0/1 uint8 by threshold; multi-class: argmax class ids."""
        if self.n_classes == 1:
            return (prob >= threshold).astype(np.uint8)
        return prob.argmax(axis=0).astype(np.uint8)
