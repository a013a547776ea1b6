"""Per-image segmentation metrics, averaged over images as the paper does.

Binary metrics (Dice, IoU/Jaccard, Precision, Recall, Specificity) come from the confusion
counts of the thresholded prediction (probability >= 0.5) against the ground truth, computed per
image. Structure-aware metrics (S-measure, mean E-measure, weighted F-measure, MAE) come from
pysodmetrics on the continuous probability map (uint8 0..255), as in the polyp benchmarks.

Empty-mask convention (normal BUSI images have an empty ground truth): a ratio whose
denominator is zero scores 1.0 when the prediction and the ground truth are BOTH empty (perfect
agreement that there is no lesion) and 0.0 otherwise. So a normal image predicted empty scores
Dice = IoU = Precision = Recall = 1; a normal image with any predicted pixel scores Dice = IoU =
Precision = 0 and Recall = 0 (nothing could be recalled, and something was wrongly found).
Away from the degenerate cases the numbers equal torchmetrics' binary_f1_score / jaccard /
precision / recall / specificity (a test checks this). pysodmetrics' own convention applies to
its metrics (weighted F-measure is 0 on an empty ground truth).

Multi-class masks (class ids): Dice per foreground class (same empty convention) and their mean.
MED (OCT layers): for each foreground class and each image column, the layer's upper boundary is
the first row holding that class and its lower boundary the last row. MED is the mean absolute
row distance between predicted and true boundaries over the columns where the ground truth has the
layer; a column where the prediction lacks the layer counts the image height (the largest possible
distance) so that missing a layer is never rewarded. Reported in pixels of the original image.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np

BINARY_METRICS = ("dice", "iou", "precision", "recall", "specificity")
SOD_METRICS = ("s_measure", "mean_e_measure", "weighted_f_measure", "mae")
# The paper's BUSI table (Tab. 4) columns, in its order, with our metric keys.
BUSI_TABLE = (("Jaccard", "iou"), ("Precision", "precision"), ("Recall", "recall"),
              ("Specificity", "specificity"), ("Dice", "dice"))


def is_distance_metric(name: str) -> bool:
    """True for distances in pixels (``med`` and each class's ``med_c<k>``), which summaries report as
    they are; every other metric is a fraction of 1 and summaries report it in percent."""
    return name == "med" or name.startswith("med_c")


def _ratio(num: float, den: float, both_empty: bool) -> float:
    if den == 0:
        return 1.0 if both_empty else 0.0
    return float(num) / float(den)


def binary_metrics(pred: np.ndarray, gt: np.ndarray) -> dict[str, float]:
    """Dice, IoU, precision, recall, specificity of one image. ``pred``/``gt``: bool arrays."""
    pred = np.asarray(pred, dtype=bool)
    gt = np.asarray(gt, dtype=bool)
    if pred.shape != gt.shape:
        raise ValueError(f"prediction shape {pred.shape} != ground-truth shape {gt.shape}")
    tp = int(np.count_nonzero(pred & gt))
    fp = int(np.count_nonzero(pred & ~gt))
    fn = int(np.count_nonzero(~pred & gt))
    tn = int(pred.size - tp - fp - fn)
    both_empty = tp + fp + fn == 0
    return {
        "dice": _ratio(2 * tp, 2 * tp + fp + fn, both_empty),
        "iou": _ratio(tp, tp + fp + fn, both_empty),
        "precision": _ratio(tp, tp + fp, both_empty),
        "recall": _ratio(tp, tp + fn, both_empty),
        "specificity": _ratio(tn, tn + fp, both_empty),
    }


def sod_metrics(prob: np.ndarray, gt: np.ndarray) -> dict[str, float]:
    """S-measure, mean E-measure, weighted F-measure and MAE (pysodmetrics) of one image.

    ``prob``: float probability map in [0, 1]; ``gt``: bool mask. One fresh metric object per
    image so the per-image values can be written to the per-case CSV.
    """
    import py_sod_metrics as sod

    pred_u8 = np.clip(np.rint(np.asarray(prob, dtype=np.float64) * 255.0), 0, 255).astype(np.uint8)
    gt_u8 = np.asarray(gt, dtype=bool).astype(np.uint8) * 255
    sm, em, wfm, mae = sod.Smeasure(), sod.Emeasure(), sod.WeightedFmeasure(), sod.MAE()
    for m in (sm, em, wfm, mae):
        m.step(pred=pred_u8, gt=gt_u8)
    return {
        "s_measure": float(sm.get_results()["sm"]),
        "mean_e_measure": float(np.mean(em.get_results()["em"]["curve"])),
        "weighted_f_measure": float(wfm.get_results()["wfm"]),
        "mae": float(mae.get_results()["mae"]),
    }


def multiclass_dice(pred: np.ndarray, gt: np.ndarray, n_classes: int) -> dict[str, float]:
    """Dice per foreground class (``dice_c1`` ...) and their mean (``dice``). Inputs: class ids."""
    out: dict[str, float] = {}
    for c in range(1, n_classes):
        out[f"dice_c{c}"] = binary_metrics(pred == c, gt == c)["dice"]
    out["dice"] = float(np.mean([out[f"dice_c{c}"] for c in range(1, n_classes)])) if n_classes > 1 else 1.0
    return out


def layer_boundaries(mask: np.ndarray, cls: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(upper, lower, present): first/last row of class ``cls`` in each column of a [H, W] mask."""
    hit = np.asarray(mask) == cls
    present = hit.any(axis=0)
    upper = np.argmax(hit, axis=0)
    lower = hit.shape[0] - 1 - np.argmax(hit[::-1], axis=0)
    return upper, lower, present


def mean_euclidean_distance(pred: np.ndarray, gt: np.ndarray, n_classes: int) -> dict[str, float]:
    """MED of each layer's boundaries (``med_c1`` ...) and their mean (``med``), in pixels."""
    height = np.asarray(gt).shape[0]
    out: dict[str, float] = {}
    for c in range(1, n_classes):
        pu, pl, pp = layer_boundaries(pred, c)
        gu, gl, gp = layer_boundaries(gt, c)
        if not gp.any():
            # The layer is absent from the ground truth: no boundary to measure (NaN, skipped in means).
            out[f"med_c{c}"] = float("nan")
            continue
        dist = np.where(pp, (np.abs(pu - gu) + np.abs(pl - gl)) / 2.0, float(height))
        out[f"med_c{c}"] = float(dist[gp].mean())
    values = [v for k, v in out.items() if not np.isnan(v)]
    out["med"] = float(np.mean(values)) if values else float("nan")
    return out


def case_metrics(prob: np.ndarray, gt: np.ndarray, n_classes: int = 1, threshold: float = 0.5,
                 with_sod: bool = True) -> dict[str, float]:
    """All metrics of one case. Binary: ``prob`` [H, W] in [0, 1]; multi-class: ``prob`` [C, H, W]."""
    if n_classes == 1:
        gt_b = np.asarray(gt) > 0
        out = binary_metrics(np.asarray(prob) >= threshold, gt_b)
        if with_sod:
            out.update(sod_metrics(prob, gt_b))
        return out
    pred = np.asarray(prob).argmax(axis=0)
    out = multiclass_dice(pred, gt, n_classes)
    out.update(mean_euclidean_distance(pred, gt, n_classes))
    return out


def mean_metrics(rows: Iterable[dict[str, float]]) -> dict[str, float]:
    """Per-image average of every numeric metric (NaNs skipped: e.g. MED of an absent layer)."""
    rows = list(rows)
    keys = [k for k, v in rows[0].items() if isinstance(v, (int, float))] if rows else []
    out = {}
    for k in keys:
        vals = np.array([r[k] for r in rows], dtype=np.float64)
        out[k] = float(np.nanmean(vals)) if not np.isnan(vals).all() else float("nan")
    return out
