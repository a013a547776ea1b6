"""The input guard: how far an image is from what the model was trained on, in the model's own features.

A segmentation model answers every image with a mask, confidently: a colonoscopy frame, a CT slice or a
blank image sent to a breast-ultrasound model gets a lesion outline. The guard scores each input by its
Mahalanobis distance to the training images in the model's encoder features and flags the ones further
than in-distribution images the model never trained on usually are.

Features: the encoder's two deepest stages, each global-average-pooled, concatenated (3072 numbers for
Res2Net-50). They are captured by a forward hook during the prediction itself (:class:`FeatureTap`), so
the guard adds a matrix-vector product per image, not a forward pass.

Fitting, per member of an ensemble (a CV's fold model): the mean and a Ledoit-Wolf shrunk covariance of
the member's training cases (a few hundred cases for thousands of features: the plain covariance is
singular), and a threshold: the ``quantile`` of the distances of cases the member did NOT train on (its
held-out fold's calibration half). The other half of the held-out cases measures the false-flag rate
that the registry reports. An ensemble's score is the mean over members of distance / threshold; an
image is flagged when it is above 1.

Stored as plain arrays (safetensors, with the settings as JSON metadata): never a pickle.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch

from m2snet.errors import M2SNetError
from m2snet.files import atomic_file

GUARD_FILE = "input_guard.safetensors"
DEFAULT_QUANTILE = 0.975  # of held-out in-distribution distances: ~2.5 % false flags by construction
POOLED_LEVELS = (-2, -1)  # the encoder's two deepest feature maps
# Fewer held-out cases per fold model than this and the threshold (a 97.5th percentile) is not worth having:
# on the 26-case demo set (3 calibration cases a fold) it flagged 64 % of held-out demo images
# (bench/guard_rates.py); registration then leaves the guard out and says why.
MIN_CALIBRATION_CASES = 20


def pooled_features(output, levels: Sequence[int]) -> torch.Tensor:
    """A backbone's output (feature maps, deepest last) -> the guard's features [N, D]: the ``levels``
    maps, each global-average-pooled, concatenated. The prediction's tap and the ONNX export use this."""
    maps = list(output) if isinstance(output, (list, tuple)) else [output]
    return torch.cat([maps[i].float().mean(dim=(2, 3)) for i in levels], dim=1)


class FeatureBuffer:
    """Where one ensemble member's guard features land batch by batch until :meth:`take`; the ONNX
    predictor fills it from the graph's feature outputs, :class:`FeatureTap` from a forward hook."""

    def __init__(self) -> None:
        self.armed = False
        self.batches: list = []

    def take(self):
        """The features captured since the last take, [N, D] (numpy; torch for an exporting tap)."""
        batches, self.batches = self.batches, []
        if batches and isinstance(batches[0], torch.Tensor):
            return torch.cat(batches)
        return np.concatenate(batches) if batches else np.zeros((0, 0), np.float32)


class FeatureTap(FeatureBuffer):
    """Captures the pooled encoder features of a model's forward passes (a forward hook on its backbone).

    ``armed`` gates the capture, so that a flipped TTA pass or a training step is not recorded; each
    captured batch is a float32 [N, D] array in ``batches`` -- or, with ``as_tensor`` (the ONNX export
    traces through it), the tensor itself.
    """

    def __init__(self, model: torch.nn.Module, levels: Sequence[int] = POOLED_LEVELS, *,
                 as_tensor: bool = False) -> None:
        super().__init__()
        backbone = model.backbone() if hasattr(model, "backbone") else None
        if not isinstance(backbone, torch.nn.Module):
            raise M2SNetError(f"{type(model).__name__}: no backbone() to take guard features from")
        self.levels = tuple(levels)
        self.as_tensor = as_tensor
        self._handle = backbone.register_forward_hook(self._hook)

    def _hook(self, module, inputs, output) -> None:
        if not self.armed:
            return
        pooled = pooled_features(output, self.levels)
        self.batches.append(pooled if self.as_tensor else pooled.detach().cpu().numpy().astype(np.float32))

    def close(self) -> None:
        self._handle.remove()


def mahalanobis(features: np.ndarray, mean: np.ndarray, precision: np.ndarray) -> np.ndarray:
    """Distance of each row of ``features`` [N, D] to ``mean`` under ``precision`` (inverse covariance).

    In float32 (a BLAS matrix product, 2x the float64 speed): the guard's cost per image is this product."""
    centred = (features - mean).astype(np.float32)
    squared = np.einsum("nd,nd->n", centred @ precision.astype(np.float32, copy=False), centred)
    return np.sqrt(np.maximum(squared.astype(np.float64), 0.0))


@dataclass
class GuardMember:
    """One model's description of its training images and its threshold."""

    mean: np.ndarray  # [D]
    precision: np.ndarray  # [D, D], the inverse of the shrunk covariance
    threshold: float  # distance at the quantile of held-out in-distribution cases

    @classmethod
    def fit(cls, train_features: np.ndarray, calibration_features: np.ndarray,
            quantile: float = DEFAULT_QUANTILE) -> "GuardMember":
        from sklearn.covariance import LedoitWolf

        if len(train_features) < 2 or len(calibration_features) < 1:
            raise M2SNetError(f"input guard: needs >= 2 training and >= 1 held-out cases, got "
                              f"{len(train_features)} and {len(calibration_features)}")
        lw = LedoitWolf().fit(train_features.astype(np.float64))
        member = cls(mean=lw.location_, precision=lw.precision_, threshold=1.0)
        distances = member.distances(calibration_features)
        member.threshold = float(np.quantile(distances, quantile))
        return member

    def distances(self, features: np.ndarray) -> np.ndarray:
        if getattr(self, "_precision32", None) is None:  # converted once, not per request
            self._precision32 = self.precision.astype(np.float32)
        return mahalanobis(features, self.mean, self._precision32)


@dataclass
class InputGuard:
    """An ensemble's guard: one member per model, in the order of the model's ensemble."""

    members: list[GuardMember]
    quantile: float = DEFAULT_QUANTILE
    levels: tuple[int, ...] = POOLED_LEVELS
    # What was measured when it was fitted (held-out false-flag rate, per out-of-distribution set...).
    rates: dict[str, Any] = field(default_factory=dict)

    def scores(self, features_per_member: Sequence[np.ndarray]) -> np.ndarray:
        """Per image: the mean over members of distance / threshold (> 1: unlike the training images)."""
        if len(features_per_member) != len(self.members):
            raise M2SNetError(f"input guard: {len(features_per_member)} feature sets for "
                              f"{len(self.members)} members")
        ratios = [m.distances(f) / m.threshold for m, f in zip(self.members, features_per_member)]
        return np.mean(ratios, axis=0)

    @staticmethod
    def flags(scores: np.ndarray) -> np.ndarray:
        return scores > 1.0

    # --- storage: arrays + JSON metadata, no pickle ----------------------------------------------
    def save(self, path: str | os.PathLike) -> Path:
        from safetensors.numpy import save_file

        tensors: dict[str, np.ndarray] = {}
        for i, m in enumerate(self.members):
            tensors[f"member{i}.mean"] = np.ascontiguousarray(m.mean, dtype=np.float64)
            tensors[f"member{i}.precision"] = np.ascontiguousarray(m.precision, dtype=np.float64)
        meta = {"format": "m2snet-input-guard/1", "quantile": self.quantile, "levels": list(self.levels),
                "thresholds": [m.threshold for m in self.members], "rates": self.rates}
        path = Path(path)
        with atomic_file(path) as tmp:
            save_file(tensors, str(tmp), metadata={"m2snet": json.dumps(meta)})
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "InputGuard":
        from safetensors import safe_open

        path = Path(path)
        try:
            with safe_open(str(path), framework="numpy") as f:
                meta = json.loads((f.metadata() or {}).get("m2snet", "{}"))
                if meta.get("format") != "m2snet-input-guard/1":
                    raise M2SNetError(f"{path}: not an m2snet input guard (format {meta.get('format')!r})")
                members = [GuardMember(mean=f.get_tensor(f"member{i}.mean"),
                                       precision=f.get_tensor(f"member{i}.precision"), threshold=float(t))
                           for i, t in enumerate(meta["thresholds"])]
        except M2SNetError:
            raise
        except Exception as err:  # noqa: BLE001 - safetensors raises several kinds for a bad file
            raise M2SNetError(f"{path}: not a readable input guard ({type(err).__name__}: {err})") from None
        return cls(members=members, quantile=float(meta["quantile"]), levels=tuple(meta["levels"]),
                   rates=dict(meta.get("rates", {})))


def auroc(in_scores: Iterable[float], out_scores: Iterable[float]) -> float:
    """Area under the ROC curve of telling out-of-distribution (positive) from in-distribution by score."""
    from sklearn.metrics import roc_auc_score

    a, b = np.asarray(list(in_scores)), np.asarray(list(out_scores))
    return float(roc_auc_score(np.r_[np.zeros(len(a)), np.ones(len(b))], np.r_[a, b]))


# --- fitting ---------------------------------------------------------------------------------------
@torch.no_grad()
def backbone_features(predictor, member: int, images: Sequence[np.ndarray], batch_size: int = 16,
                      levels: Sequence[int] = POOLED_LEVELS) -> np.ndarray:
    """The pooled encoder features of ``images`` (uint8 RGB arrays) under ensemble member ``member``,
    preprocessed exactly as the predictor preprocesses a prediction; runs the encoder only."""
    model = predictor.models[member]
    tap = FeatureTap(model, levels)
    tap.armed = True
    try:
        for start in range(0, len(images), batch_size):
            model.backbone()(predictor._batch_tensor(images[start:start + batch_size]))
        return tap.take()
    finally:
        tap.close()


def held_out_halves(case_ids: Sequence[str]) -> tuple[list[str], list[str]]:
    """Held-out cases split in two by a hash of the id (stable, not a draw): the calibration half sets
    the threshold, the other half measures the false-flag rate the threshold gives."""
    import hashlib

    calibration, measurement = [], []
    for cid in sorted(case_ids):
        (calibration if hashlib.sha256(cid.encode()).digest()[0] % 2 == 0 else measurement).append(cid)
    return calibration, measurement


@dataclass
class GuardFit:
    guard: InputGuard
    # Per member: its held-out measurement half's scores (member's distance / its threshold).
    held_out_scores: list[np.ndarray]
    held_out_ids: list[list[str]]

    def held_out_flag_rate(self) -> float:
        scores = np.concatenate(self.held_out_scores)
        return float(np.mean(scores > 1.0)) if len(scores) else float("nan")


def calibration_sizes(split, folds: Sequence[int]) -> list[int]:
    """How many held-out cases would set each member's threshold (see :func:`held_out_halves`)."""
    return [len(held_out_halves(split.fold(k).val)[0]) for k in folds]


def fit_guard(predictor, data, split, folds: Sequence[int], quantile: float = DEFAULT_QUANTILE) -> GuardFit:
    """An ensemble's guard: member i is the model of fold ``folds[i]`` of ``split`` on dataset ``data``
    (a DatasetInfo), fitted on that fold's training cases and calibrated on half of its held-out cases."""
    from m2snet.data.images import read_rgb

    if len(folds) != len(predictor.models):
        raise M2SNetError(f"input guard: {len(folds)} folds for an ensemble of {len(predictor.models)} models")
    by_id = {c.case_id: c for c in data.cases}

    def images(ids: Sequence[str]) -> list[np.ndarray]:
        return [read_rgb(by_id[i].image_path) for i in ids]

    members, held_scores, held_ids = [], [], []
    for i, k in enumerate(folds):
        fold = split.fold(k)
        calibration, measurement = held_out_halves(fold.val)
        if not calibration:  # too few held-out cases to halve (a toy set): all calibrate, none measure
            calibration, measurement = sorted(fold.val), []
        member = GuardMember.fit(backbone_features(predictor, i, images(fold.train)),
                                 backbone_features(predictor, i, images(calibration)), quantile)
        members.append(member)
        measured = backbone_features(predictor, i, images(measurement)) if measurement else None
        held_scores.append(member.distances(measured) / member.threshold if measured is not None else np.zeros(0))
        held_ids.append(measurement)
    fit = GuardFit(InputGuard(members=members, quantile=quantile), held_scores, held_ids)
    fit.guard.rates["held_out_flag_rate"] = fit.held_out_flag_rate()
    fit.guard.rates["held_out_cases"] = int(sum(len(s) for s in held_scores))
    return fit
