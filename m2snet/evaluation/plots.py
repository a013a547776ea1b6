"""Figures: an overlay grid of cases (image | ground truth | prediction) and learning curves.

matplotlib runs on the Agg backend (no display needed, safe in workers and containers).
"""

from __future__ import annotations

import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from m2snet.files import atomic_file


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


@dataclass
class OverlayCase:
    case_id: str
    image: np.ndarray  # [H, W, 3] uint8
    gt: np.ndarray  # [H, W] class ids / 0-1
    pred: np.ndarray  # [H, W] class ids / 0-1
    score: float  # shown in the title (Dice)
    tag: str = ""  # "best" / "worst"


def _tint(image: np.ndarray, mask: np.ndarray, color: tuple[int, int, int]) -> np.ndarray:
    """Blend a colour over the image where mask > 0 (class ids get shades of the colour)."""
    out = image.astype(np.float32).copy()
    m = np.asarray(mask) > 0
    out[m] = 0.5 * out[m] + 0.5 * np.asarray(color, dtype=np.float32)
    return out.clip(0, 255).astype(np.uint8)


def _save(plt, fig, out_path: str | Path, title: str = "") -> Path:
    """Title the figure (leaving it room above the panels), write the PNG, free the figure."""
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.97) if title else None)
    with atomic_file(out_path) as tmp:  # the temporary's suffix is .tmp: name the format
        fig.savefig(tmp, dpi=80, format=out_path.suffix.lstrip(".") or "png")
    plt.close(fig)
    return out_path


def overlay_grid(cases: Sequence[OverlayCase], out_path: str | Path, title: str = "") -> Path:
    """One row per case: the image, the ground truth (green) and the prediction (red)."""
    plt = _pyplot()
    n = max(1, len(cases))
    fig, axes = plt.subplots(n, 3, figsize=(9, 3 * n), squeeze=False)
    for row, case in zip(axes, cases):
        row[0].imshow(case.image)
        row[0].set_title(f"{case.tag} {case.case_id}".strip(), fontsize=8)
        row[1].imshow(_tint(case.image, case.gt, (0, 255, 0)))
        row[1].set_title("ground truth", fontsize=8)
        row[2].imshow(_tint(case.image, case.pred, (255, 0, 0)))
        row[2].set_title(f"prediction (Dice {case.score:.3f})", fontsize=8)
        for ax in row:
            ax.axis("off")
    return _save(plt, fig, out_path, title)


def learning_curves(history: Sequence[dict], out_path: str | Path, title: str = "") -> Path:
    """Train loss and validation Dice/IoU per epoch (history rows from the trainer)."""
    plt = _pyplot()
    epochs = [h["epoch"] for h in history]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.plot(epochs, [h.get("train_loss", np.nan) for h in history], marker="o", label="train loss")
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("loss")
    ax1.legend()
    for key in ("val_dice", "val_iou"):
        vals = [h.get(key, np.nan) for h in history]
        if not np.all(np.isnan(np.asarray(vals, dtype=float))):
            ax2.plot(epochs, vals, marker="o", label=key)
    ax2.set_xlabel("epoch")
    ax2.set_ylabel("validation metric")
    ax2.set_ylim(0, 1)
    ax2.legend()
    return _save(plt, fig, out_path, title)


def cv_learning_curves(histories: dict[int, Sequence[dict]], out_path: str | Path, title: str = "") -> Path:
    """Train loss and validation Dice per epoch, one line per fold."""
    plt = _pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for fold, history in sorted(histories.items()):
        epochs = [h["epoch"] for h in history]
        ax1.plot(epochs, [h.get("train_loss", np.nan) for h in history], marker="o", label=f"fold {fold}")
        ax2.plot(epochs, [h.get("val_dice", np.nan) for h in history], marker="o", label=f"fold {fold}")
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("train loss")
    ax2.set_xlabel("epoch")
    ax2.set_ylabel("validation Dice")
    ax2.set_ylim(0, 1)
    for ax in (ax1, ax2):
        ax.legend(fontsize=8)
    return _save(plt, fig, out_path, title)


def compare_val_dice(runs: dict[str, Sequence[Sequence[dict]]], out_path: str | Path, title: str = "") -> Path:
    """Per-epoch validation Dice of several CV runs, mean over folds (band: min..max), one line each."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, folds in runs.items():
        epochs = min(len(h) for h in folds)
        dice = np.array([[row.get("val_dice", np.nan) for row in h[:epochs]] for h in folds], dtype=float)
        x = np.arange(1, epochs + 1)
        (line,) = ax.plot(x, np.nanmean(dice, axis=0), marker="o", label=label)
        ax.fill_between(x, np.nanmin(dice, axis=0), np.nanmax(dice, axis=0), color=line.get_color(), alpha=0.15)
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation Dice (train size; mean, min..max over folds)")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(plt, fig, out_path, textwrap.fill(title, 90))


def paired_scores(a: np.ndarray, b: np.ndarray, fold: np.ndarray, out_path: str | Path, *, metric: str = "dice",
                  label_a: str = "A", label_b: str = "B", title: str = "") -> Path:
    """Two panels for a paired comparison: per-case B against A (one colour per fold, the diagonal
    y = x: above it B wins), and the histogram of the differences B - A (zero and the mean marked)."""
    plt = _pyplot()
    a, b, fold = np.asarray(a, dtype=float), np.asarray(b, dtype=float), np.asarray(fold)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4.5))
    for f in np.unique(fold):
        ax1.scatter(a[fold == f], b[fold == f], s=12, alpha=0.7, label=f"fold {f}")
    ax1.plot([0, 1], [0, 1], color="k", lw=1, ls="--")
    ax1.set_xlim(-0.02, 1.02)
    ax1.set_ylim(-0.02, 1.02)
    ax1.set_aspect("equal")
    ax1.set_xlabel(textwrap.shorten(f"{metric} A: {label_a}", 60))
    ax1.set_ylabel(textwrap.shorten(f"{metric} B: {label_b}", 60))
    ax1.legend(fontsize=8)
    diff = b - a
    ax2.hist(diff, bins=min(40, max(5, len(diff) // 4)), color="tab:blue", alpha=0.8)
    ax2.axvline(0.0, color="k", lw=1)
    ax2.axvline(float(diff.mean()), color="tab:red", lw=1.5, label=f"mean {diff.mean():+.4f}")
    ax2.set_xlabel(f"{metric} B - A per case")
    ax2.set_ylabel("cases")
    ax2.legend(fontsize=8)
    return _save(plt, fig, out_path, textwrap.fill(title, 100))
