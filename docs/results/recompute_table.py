"""Recompute a CV table from its per-case CSV alone (standard library only, no m2snet code), so a reader can
check the README's real-data figures: per fold the mean over its cases, then mean ± std (n-1) over folds, in
percent; rows for all cases, lesion cases, and the no-skill (all-background) predictor on the same cases
(an empty prediction scores 1 on a case without a lesion and 0 on one with a lesion; specificity 1 always).

    python docs/results/recompute_table.py docs/results/busi-cpu/m2snet/cv_per_case.csv
"""

from __future__ import annotations

import csv
import math
import statistics
import sys
from collections import defaultdict

COLUMNS = (("Jaccard", "iou"), ("Precision", "precision"), ("Recall", "recall"), ("Specificity", "specificity"),
           ("Dice", "dice"))


def no_skill(row: dict[str, str], metric: str) -> float:
    return 1.0 if metric == "specificity" or row["lesion"] == "0" else 0.0


def cell(rows: list[dict[str, str]], metric: str, score) -> str:
    by_fold: dict[tuple[str, str], list[float]] = defaultdict(list)
    for r in rows:
        value = score(r, metric)
        if not math.isnan(value):
            by_fold[(r["seed"], r["fold"])].append(value)
    means = [100 * statistics.fmean(v) for v in by_fold.values()]
    std = statistics.stdev(means) if len(means) > 1 else 0.0
    return f"{statistics.fmean(means):.2f} ± {std:.2f}"


def table(path: str) -> str:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    folds = sorted({(r["seed"], r["fold"]) for r in rows})
    lesion = [r for r in rows if r["lesion"] == "1"]
    model = lambda r, m: float(r[m])  # noqa: E731
    lines = [f"| {len(folds)} folds (recomputed from {path}) | " + " | ".join(c for c, _ in COLUMNS) + " |",
             "|---" * (len(COLUMNS) + 1) + "|"]
    for label, subset, score in (("model: all cases", rows, model), ("model: lesion cases", lesion, model),
                                 ("no skill: all cases", rows, no_skill), ("no skill: lesion cases", lesion, no_skill)):
        lines.append(f"| {label} ({len(subset)}) | " + " | ".join(cell(subset, m, score) for _, m in COLUMNS) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    for p in sys.argv[1:]:
        print(table(p))
