"""Evaluate a checkpoint (or an ensemble of checkpoints) on cases of a dataset directory.

Writes ``per_case.csv`` (one row per case: id, label, size, lesion or not, every metric),
``metrics.json`` (per-image means: see :func:`m2snet.evaluation.metrics.summarize_cases`) and
``overlays.png`` (the best and worst cases by Dice: image, ground truth, prediction). Predictions are
scored at each case's original size, threshold 0.5 (see :mod:`m2snet.evaluation.metrics` for the
metric definitions, the zero-denominator convention and the two protocols).

Every evaluation also scores the no-skill predictor (all background: a probability map of zeros)
on the same cases, through the same metric function and protocol, so a table can show what a model
that finds nothing would have scored (``noskill_*``).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from m2snet import progress as progress_events
from m2snet.data.format import load_dataset
from m2snet.data.images import read_mask, read_rgb
from m2snet.errors import M2SNetError
from m2snet.evaluation.metrics import DEFAULT_PROTOCOL, case_metrics, check_protocol, has_lesion, summarize_cases
from m2snet.evaluation.plots import OverlayCase, overlay_grid
from m2snet.evaluation.predict import Predictor
from m2snet.files import write_csv, write_json
from m2snet.runtime import resolve_device

log = logging.getLogger("m2snet.evaluation")


class NoSkillPredictor:
    """The all-background predictor: a probability map of zeros at each image's size (no model).

    Evaluated like any :class:`Predictor` (``m2snet evaluate --no-skill``): what a model that finds
    nothing scores on a set."""

    def __init__(self, n_classes: int = 1, batch_size: int = 8):
        self.n_classes, self.batch_size = n_classes, batch_size

    def predict_proba(self, images: Sequence[np.ndarray]) -> list[np.ndarray]:
        return [no_skill_map(np.asarray(im).shape[:2], self.n_classes) for im in images]

    def to_mask(self, prob: np.ndarray, threshold: float = 0.5) -> np.ndarray:
        return np.zeros(prob.shape[-2:], np.uint8)


def no_skill_map(shape: tuple[int, int], n_classes: int = 1) -> np.ndarray:
    """All background: zeros [H, W] (binary), or [C, H, W] whose argmax is class 0."""
    return np.zeros(tuple(shape) if n_classes == 1 else (n_classes, *shape), np.float32)


@dataclass
class EvalResult:
    metrics: dict[str, float]  # per-image means (model, lesion_, noskill_) and counts (n_*)
    rows: list[dict] = field(repr=False)  # per-case rows (as in the CSV)
    per_case_csv: Path | None = None
    metrics_json: Path | None = None
    overlay_png: Path | None = None

    @property
    def n_cases(self) -> int:
        return len(self.rows)


def _load_pair(case) -> tuple[np.ndarray, np.ndarray]:
    return read_rgb(case.image_path), read_mask(case.mask_path)


def evaluate_predictor(
    predictor: Predictor,
    data: str | os.PathLike,
    case_ids: Sequence[str] | None = None,
    out_dir: str | os.PathLike | None = None,
    n_overlay: int = 3,
    with_sod: bool = True,
    progress: bool = False,
    title: str = "",
    protocol: str = DEFAULT_PROTOCOL,
) -> EvalResult:
    """Score ``predictor`` on ``case_ids`` (default: every case) of the dataset at ``data`` under the metric
    ``protocol``; the all-background predictor is scored on the same cases the same way."""
    check_protocol(protocol)
    info = load_dataset(data)
    if info.n_classes != predictor.n_classes:
        raise M2SNetError(
            f"{data}: dataset has n_classes={info.n_classes} but the model predicts {predictor.n_classes}"
        )
    cases = [info.case(c) for c in case_ids] if case_ids is not None else list(info.cases)
    if not cases:
        raise M2SNetError(f"{data}: no cases to evaluate")
    rows: list[dict] = []
    noskill_rows: list[dict[str, float]] = []
    keep: list[tuple[float, OverlayCase]] = []
    bar = progress_events.bar(total=len(cases), desc="evaluate", unit="img", disable=not progress)
    for start in range(0, len(cases), predictor.batch_size):
        chunk = cases[start:start + predictor.batch_size]
        pairs = [_load_pair(c) for c in chunk]
        probs = predictor.predict_proba([p[0] for p in pairs])
        for case, (image, mask), prob in zip(chunk, pairs, probs):
            m = case_metrics(prob, mask, predictor.n_classes, with_sod=with_sod, protocol=protocol)
            noskill_rows.append(case_metrics(no_skill_map(mask.shape[:2], predictor.n_classes), mask,
                                             predictor.n_classes, with_sod=with_sod, protocol=protocol))
            pred = predictor.to_mask(prob)
            rows.append({"case_id": case.case_id, "label": case.label, "height": image.shape[0],
                         "width": image.shape[1], "lesion": int(has_lesion(mask)), **m,
                         "pred_foreground_fraction": float((pred > 0).mean())})
            keep.append((m["dice"], OverlayCase(case.case_id, image, mask, pred, m["dice"])))
        bar.update(len(chunk))
    bar.close()
    # Means over the metric columns only (not the id/label/size/lesion columns of the CSV).
    skip = {"case_id", "label", "height", "width", "lesion"}
    model_rows = [{k: v for k, v in r.items() if k not in skip} for r in rows]
    result = EvalResult(metrics=summarize_cases(model_rows, noskill_rows, [bool(r["lesion"]) for r in rows]),
                        rows=rows)
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        result.per_case_csv = out / "per_case.csv"
        write_csv(result.per_case_csv, rows, list(rows[0]))
        result.metrics_json = out / "metrics.json"
        write_json(result.metrics_json, result.metrics)
        # Best and worst cases by Dice (stable order: ties broken by case id).
        ordered = sorted(keep, key=lambda t: (t[0], t[1].case_id))
        worst = [c for _, c in ordered[:n_overlay]]
        best = [c for _, c in ordered[::-1][:n_overlay] if c not in worst]
        for c in best:
            c.tag = "best"
        for c in worst:
            c.tag = "worst"
        result.overlay_png = overlay_grid(best + worst, out / "overlays.png", title=title)
    log.info("evaluated %d cases: %s", len(rows),
             ", ".join(f"{k}={v:.4f}" for k, v in result.metrics.items() if k in
                       ("dice", "iou", "precision", "recall", "specificity", "med")))
    progress_events.emit("evaluated", cases=len(rows), dice=result.metrics.get("dice"))
    return result


@dataclass(frozen=True)
class EvalOptions:
    """How :func:`evaluate` runs the checkpoints (flip TTA, device, batch size), what it writes beside the
    scores (overlays, S-measure/E-measure/MAE) and under which metric protocol it scores."""

    tta_flip: bool = False
    device: str = "auto"
    batch_size: int = 8
    n_overlay: int = 3  # worst / median / best cases drawn in the overlay figure
    with_sod: bool = True  # the salient-object metrics (S-measure, E-measure, MAE) too
    progress: bool = True
    protocol: str = DEFAULT_PROTOCOL


def evaluate(
    checkpoints: Sequence[str | os.PathLike],
    data: str | os.PathLike,
    case_ids: Sequence[str] | None = None,
    out_dir: str | os.PathLike | None = None,
    options: EvalOptions = EvalOptions(),
) -> EvalResult:
    """Load the checkpoint(s) (averaging their probabilities) and evaluate on the dataset."""
    check_protocol(options.protocol)
    device = resolve_device(options.device)
    predictor = Predictor.from_checkpoints(list(checkpoints), device=device, tta_flip=options.tta_flip,
                                           batch_size=options.batch_size)
    with torch.inference_mode():
        return evaluate_predictor(predictor, data, case_ids, out_dir, n_overlay=options.n_overlay,
                                  with_sod=options.with_sod, progress=options.progress, protocol=options.protocol,
                                  title=", ".join(Path(c).name for c in checkpoints))
