"""Evaluate one model on every named test set of a fixed split: one row per set plus their mean.

The layout is the paper's Tab. 1 (polyps): mDice, mIoU, weighted F-measure, S-measure, mean
E-measure and MAE per test set, as fractions with three decimals. Each set is scored by
:func:`m2snet.evaluation.evaluate.evaluate_predictor` (per-image means, original sizes) into its own
folder ``<out>/<set>/`` (per-case CSV, metrics JSON, overlays); the ``mean`` row is the unweighted mean
of the set means (each test set counts once, whatever its size), as benchmark papers average.

Under every row the table prints the no-skill predictor's (all background) on the same cases: the
evaluation scores it beside the model (``noskill_<metric>``, as in a CV table), so a model that learnt
nothing shows as a row no better than the one beneath it.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch

from m2snet.data.split import Split
from m2snet.errors import M2SNetError
from m2snet.evaluation.evaluate import EvalResult, evaluate_predictor
from m2snet.evaluation.metrics import DEFAULT_PROTOCOL, NOSKILL_PREFIX
from m2snet.evaluation.predict import Predictor
from m2snet.files import write_json, write_text
from m2snet.runtime import resolve_device

# The paper's Tab. 1 columns, in its order (Sec. 4.2 names them), with our metric keys.
POLYP_TABLE = (("mDice", "dice"), ("mIoU", "iou"), ("wFm", "weighted_f_measure"), ("Sm", "s_measure"),
               ("mEm", "mean_e_measure"), ("MAE", "mae"))
# Multi-class sets (OCT layers) have no structure measures: Dice and MED.
MULTICLASS_TABLE = (("mDice", "dice"), ("MED", "med"))
MEAN_ROW = "mean"
NOSKILL_LABEL = "no skill"  # the all-background predictor's row under each set's


def metric_key(test_set: str, metric: str) -> str:
    """The MLflow metric name of a test set's metric: ``CVC-300_dice`` (MLflow allows ``-``, ``.``, ``_``)."""
    return f"{re.sub(r'[^A-Za-z0-9_.-]+', '_', test_set)}_{metric}"


@dataclass
class TestSetReport:
    """Per-test-set means (fractions) and their unweighted mean."""

    rows: dict[str, dict[str, float]]  # test set -> metric means (n_cases included)
    results: dict[str, EvalResult] = field(default_factory=dict, repr=False)
    columns: tuple[tuple[str, str], ...] = POLYP_TABLE

    @property
    def mean(self) -> dict[str, float]:
        keys = [k for k in next(iter(self.rows.values())) if all(k in r for r in self.rows.values())]
        return {k: float(np.nanmean([r[k] for r in self.rows.values()])) for k in keys if k != "n_cases"}

    def table(self, title: str = "test set") -> str:
        """Markdown, one row per test set and the mean row, each followed by the no-skill predictor's
        row on the same cases; three decimals as the paper prints."""
        head = "| " + " | ".join([title, "n", *[c for c, _ in self.columns]]) + " |"
        lines = [head, "|" + "---|" * (len(self.columns) + 2)]
        for name, row in [*self.rows.items(), (MEAN_ROW, {**self.mean, "n_cases": sum(
                r.get("n_cases", 0) for r in self.rows.values())})]:
            n = str(int(row.get("n_cases", 0)))
            for label, prefix in ((name, ""), (f"{name}: {NOSKILL_LABEL}", NOSKILL_PREFIX)):
                if prefix and not any(prefix + k in row for _, k in self.columns):
                    continue  # a report read back from an older test_sets.json
                cells = [f"{row[prefix + k]:.3f}" if prefix + k in row else "n/a" for _, k in self.columns]
                lines.append("| " + " | ".join([label, n, *cells]) + " |")
        return "\n".join(lines)

    def flat_metrics(self) -> dict[str, float]:
        """Every set's metrics under ``<set>_<metric>`` and the mean row under ``mean_<metric>``."""
        out = {metric_key(s, k): v for s, row in self.rows.items() for k, v in row.items()}
        out.update({metric_key(MEAN_ROW, k): v for k, v in self.mean.items()})
        return out

    def write(self, out_dir: str | os.PathLike, title: str = "test set") -> tuple[Path, Path]:
        """``test_sets.json`` (rows + mean) and ``test_sets.md`` (the table) in ``out_dir``."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "test_sets.json", {"rows": self.rows, "mean": self.mean,
                                            "mean_rule": "unweighted mean of the test-set means"})
        write_text(out / "test_sets.md", self.table(title) + "\n")
        return out / "test_sets.json", out / "test_sets.md"


def table_columns(n_classes: int) -> tuple[tuple[str, str], ...]:
    return POLYP_TABLE if n_classes == 1 else MULTICLASS_TABLE


def evaluate_sets(predictor: Predictor, data: str | os.PathLike, test_sets: Mapping[str, Sequence[str]],
                  out_dir: str | os.PathLike | None = None, progress: bool = False,
                  protocol: str = DEFAULT_PROTOCOL) -> TestSetReport:
    """Score ``predictor`` on each named set of case ids (``<out_dir>/<set>/`` per set)."""
    if not test_sets:
        raise M2SNetError(f"{data}: no test sets to evaluate")
    results: dict[str, EvalResult] = {}
    for name, ids in test_sets.items():
        sub = Path(out_dir) / re.sub(r"[^A-Za-z0-9_.-]+", "_", name) if out_dir is not None else None
        with torch.inference_mode():
            results[name] = evaluate_predictor(predictor, data, list(ids), sub, progress=progress, title=name,
                                               protocol=protocol)
    return TestSetReport(rows={n: dict(r.metrics) for n, r in results.items()}, results=results,
                         columns=table_columns(predictor.n_classes))


def evaluate_split_test_sets(checkpoints: Sequence[str | os.PathLike], data: str | os.PathLike, split: Split,
                             out_dir: str | os.PathLike | None = None, *, tta_flip: bool = False,
                             device: str = "auto", batch_size: int = 8, progress: bool = False,
                             protocol: str = DEFAULT_PROTOCOL) -> TestSetReport:
    """Load the checkpoint(s) and score every test set of the fixed ``split``."""
    if not split.is_fixed:
        raise M2SNetError(f"{split.path}: not a fixed split (no named test sets); evaluate a fold with --fold")
    predictor = Predictor.from_checkpoints(list(checkpoints), device=resolve_device(device), tta_flip=tta_flip,
                                           batch_size=batch_size)
    return evaluate_sets(predictor, data, split.test_sets, out_dir, progress=progress, protocol=protocol)
