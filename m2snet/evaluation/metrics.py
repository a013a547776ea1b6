"""Per-image segmentation metrics, averaged over images as the paper does.

Binary metrics (Dice, IoU/Jaccard, Precision, Recall, Specificity) come from the confusion
counts of the thresholded prediction (probability >= 0.5) against the ground truth, computed per
image. Structure-aware metrics (S-measure, mean E-measure, weighted F-measure, MAE) come from
pysodmetrics on the continuous probability map (uint8 0..255), as in the polyp benchmarks.

Zero-denominator convention (normal BUSI images have an empty ground truth; a lesion can fill a
whole crop): a ratio whose denominator is zero scores 1.0 when the prediction equals the ground
truth (no false positive, no false negative) and 0.0 otherwise. So a normal image predicted empty
scores Dice = IoU = Precision = Recall = 1; a normal image with any predicted pixel scores Dice =
IoU = Precision = 0 and Recall = 0 (nothing could be recalled, and something was wrongly found);
an all-foreground ground truth predicted all-foreground has Specificity 1 (no negative to miss).
Away from the degenerate cases the numbers equal torchmetrics' binary_f1_score / jaccard /
precision / recall / specificity (a test checks this). pysodmetrics' own convention applies to
its metrics (weighted F-measure is 0 on an empty ground truth).

Which metrics min-max-normalise the map: none of the binary metrics (the probability is thresholded
as it is). The structure-aware ones do: pysodmetrics rescales each image's map to [0, 1] (MATLAB's
``mapminmax``) before S-measure, E-measure, weighted F-measure and MAE, so a map whose values all lie
below 0.5 can still score well there. Under the ``reference`` protocol (below) every metric does.

NaN: a metric can be undefined for one case (pysodmetrics' S-measure is NaN when the ground truth's
centroid falls on the last row or column; MED of a layer absent from the ground truth; the Dice of a
class absent from both maps). Means leave such cases out and :func:`mean_metrics` reports how many
were left out, as ``n_nan_<metric>``, so the table can say so.

Protocols (``PROTOCOLS``): ``project`` (the default, above) and ``reference``, the authors'
``test_score.py`` (:func:`reference_binary_metrics`) for comparison with the paper's tables.

Multi-class masks (class ids): Dice per foreground class (same zero-denominator convention; a class
absent from both the prediction and the ground truth is NaN, not a free 1) and the mean over the
classes that are defined.
MED (OCT layers): for each foreground class and each image column, the layer's upper boundary is
the first row holding that class and its lower boundary the last row. MED is the mean absolute
row distance between predicted and true boundaries over the columns where the ground truth has the
layer; a column where the prediction lacks the layer counts the image height (the largest possible
distance) so that missing a layer is never rewarded. Reported in pixels of the original image.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np

from m2snet.errors import M2SNetError

BINARY_METRICS = ("dice", "iou", "precision", "recall", "specificity")
SOD_METRICS = ("s_measure", "mean_e_measure", "weighted_f_measure", "mae")
# The paper's BUSI table (Tab. 4) columns, in its order, with our metric keys.
BUSI_TABLE = (("Jaccard", "iou"), ("Precision", "precision"), ("Recall", "recall"),
              ("Specificity", "specificity"), ("Dice", "dice"))


PROTOCOLS = ("project", "reference")
DEFAULT_PROTOCOL = "project"

# Fold-level metric names (:func:`summarize_cases`): ``dice`` is the model on all cases, ``lesion_dice``
# the model on the cases whose ground truth has a lesion, ``noskill_dice`` / ``noskill_lesion_dice``
# the all-background predictor on the same cases; ``n_*`` are counts (``n_cases``, ``n_lesion_cases``,
# ``n_nan_<metric>``), summed over folds, never averaged.
NOSKILL_PREFIX = "noskill_"
LESION_PREFIX = "lesion_"
COUNT_PREFIX = "n_"


def base_metric(name: str) -> str:
    """``noskill_lesion_dice`` -> ``dice``: the metric a fold-level name measures."""
    for prefix in (NOSKILL_PREFIX, LESION_PREFIX):
        if name.startswith(prefix):
            name = name[len(prefix):]
    return name


def is_count(name: str) -> bool:
    """True for counts (``n_cases``, ``n_lesion_cases``, ``n_nan_<metric>``, ``noskill_n_nan_<metric>``)."""
    return base_metric(name).startswith(COUNT_PREFIX)


def is_distance_metric(name: str) -> bool:
    """True for distances in pixels (``med`` and each class's ``med_c<k>``), which summaries report as
    they are."""
    name = base_metric(name)
    return name == "med" or name.startswith("med_c")


def is_percent_metric(name: str) -> bool:
    """True for the fractions summaries show in percent: all but distances (pixels) and MAE, which the
    paper reports as a fraction (e.g. 0.025)."""
    return not is_distance_metric(name) and base_metric(name) != "mae" and not is_count(name)


def check_protocol(protocol: str) -> str:
    if protocol not in PROTOCOLS:
        raise M2SNetError(f"metric protocol {protocol!r}: choose one of {list(PROTOCOLS)}")
    return protocol


def has_lesion(gt: np.ndarray) -> bool:
    """A lesion case: the ground truth has a foreground pixel.

    Decided from the mask, not from the label: it is what the metrics see, and it works for any set
    (the demo, a folder import without labels). On an imported set it equals the importer's
    ``lesion_labels`` (BUSI: benign + malignant = 647 of 780 cases), because validation requires those
    cases' masks to be non-empty and the ``empty_labels`` cases' (normal) to be empty."""
    return bool(np.any(np.asarray(gt) > 0))


def _ratio(num: float, den: float, perfect: bool) -> float:
    if den == 0:
        return 1.0 if perfect else 0.0
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
    perfect = fp + fn == 0
    return {
        "dice": _ratio(2 * tp, 2 * tp + fp + fn, perfect),
        "iou": _ratio(tp, tp + fp + fn, perfect),
        "precision": _ratio(tp, tp + fp, perfect),
        "recall": _ratio(tp, tp + fn, perfect),
        "specificity": _ratio(tn, tn + fp, perfect),
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
    """Dice per foreground class (``dice_c1`` ...) and their mean (``dice``). Inputs: class ids.

    A class absent from both maps has no Dice (NaN): scoring it 1 would reward a model for every
    layer an image happens not to show. ``dice`` is the mean over the defined classes (NaN if none).
    """
    out: dict[str, float] = {}
    for c in range(1, n_classes):
        p, g = pred == c, gt == c
        out[f"dice_c{c}"] = binary_metrics(p, g)["dice"] if p.any() or g.any() else float("nan")
    values = [v for v in out.values() if not np.isnan(v)]
    out["dice"] = float(np.mean(values)) if values else float("nan")
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


# The authors' smoothing (utils/metric.py of the reference code): 1e-5 on both sides of each ratio.
REFERENCE_SMOOTH = 1e-5


def reference_map(prob: np.ndarray) -> np.ndarray:
    """The probability map as the authors score it: saved as uint8 by truncation (torchvision's
    ``ToPILImage``: ``mul(255).byte()``), read back, then min-max-normalised per image (a constant
    map is only divided by 255)."""
    res = np.floor(np.clip(np.asarray(prob, dtype=np.float64), 0.0, 1.0) * 255.0)
    lo, hi = res.min(), res.max()
    return res / 255.0 if hi == lo else (res - lo) / (hi - lo)


def reference_binary_metrics(prob: np.ndarray, gt: np.ndarray) -> dict[str, float]:
    """The paper's protocol (``test_score.py``): soft Dice of the normalised map, IoU of the map > 0.5,
    both smoothed by 1e-5; ground truth ``gt / max > 0.5``.

    ``test_score.py`` scores no Precision / Recall / Specificity (the paper's BUSI table has them; how
    it computed them is not published): here they come from the same map > 0.5 under this project's
    zero-denominator convention (the 1e-5 smoothing would give an empty prediction Precision 1 on every
    lesion case), so the row is complete without flattering a model that finds nothing.
    """
    res = reference_map(prob)
    g = np.asarray(gt, dtype=np.float64)
    gt_b = (g / (g.max() + 1e-8)) > 0.5
    s = REFERENCE_SMOOTH
    pred_b = res > 0.5
    inter, union = np.count_nonzero(pred_b & gt_b), np.count_nonzero(pred_b | gt_b)
    thresholded = binary_metrics(pred_b, gt_b)
    return {
        "dice": float((2.0 * np.sum(res * gt_b) + s) / (np.sum(gt_b) + np.sum(res) + s)),
        "iou": float((inter + s) / (union + s)),
        "precision": thresholded["precision"],
        "recall": thresholded["recall"],
        "specificity": thresholded["specificity"],
    }


def case_metrics(prob: np.ndarray, gt: np.ndarray, n_classes: int = 1, threshold: float = 0.5,
                 with_sod: bool = True, protocol: str = DEFAULT_PROTOCOL) -> dict[str, float]:
    """All metrics of one case. Binary: ``prob`` [H, W] in [0, 1]; multi-class: ``prob`` [C, H, W].

    ``protocol``: ``project`` (thresholded binary metrics, see the module doc) or ``reference`` (the
    authors' ``test_score.py``; binary masks only)."""
    check_protocol(protocol)
    if protocol == "reference":
        if n_classes != 1:
            raise M2SNetError("metric protocol 'reference' scores binary masks only (the paper's test_score.py)")
        g = np.asarray(gt, dtype=np.float64)
        out = reference_binary_metrics(prob, gt)
        if with_sod:
            out.update(sod_metrics(reference_map(prob), (g / (g.max() + 1e-8)) > 0.5))
        return out
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
    """Per-image average of every numeric metric. A case where a metric is NaN (see the module doc) is
    left out of that metric's mean and counted: ``n_nan_<metric>`` (present only when non-zero)."""
    rows = list(rows)
    keys = [k for k, v in rows[0].items() if isinstance(v, (int, float))] if rows else []
    out, nans = {}, {}
    for k in keys:
        vals = np.array([r[k] for r in rows], dtype=np.float64)
        out[k] = float(np.nanmean(vals)) if not np.isnan(vals).all() else float("nan")
        if np.isnan(vals).any():
            nans[f"{COUNT_PREFIX}nan_{k}"] = float(np.isnan(vals).sum())
    return {**out, **nans}


def summarize_cases(rows: Sequence[dict[str, float]], noskill_rows: Sequence[dict[str, float]],
                    lesion: Sequence[bool]) -> dict[str, float]:
    """One evaluation's metric dict: the model's means over all cases and over the lesion cases, the
    all-background predictor's (``noskill_``) on the same cases, and the counts (see ``NOSKILL_PREFIX``)."""
    lesion_rows = [r for r, keep in zip(rows, lesion) if keep]
    lesion_noskill = [r for r, keep in zip(noskill_rows, lesion) if keep]
    out = {**mean_metrics(rows), "n_cases": float(len(rows)), "n_lesion_cases": float(len(lesion_rows))}
    out.update({LESION_PREFIX + k: v for k, v in mean_metrics(lesion_rows).items() if not is_count(k)})
    out.update({NOSKILL_PREFIX + k: v for k, v in mean_metrics(noskill_rows).items()})
    out.update({NOSKILL_PREFIX + LESION_PREFIX + k: v for k, v in mean_metrics(lesion_noskill).items()
                if not is_count(k)})
    return out
