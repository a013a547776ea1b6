"""A cross-validation's report: mean +- std over its (seed, fold) runs, as a table and as metrics.

:func:`summarize_cv` turns per-fold metrics into mean +- std in percent (sample std, ddof=1; 0 for a single
fold); :func:`report_cv` is THE CV report of ``m2snet cv`` and the pipeline's aggregate step alike: the
files, the parent run's ``cv_*`` metrics and its description.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from m2snet.errors import M2SNetError
from m2snet.evaluation.metrics import (
    BUSI_TABLE,
    DEFAULT_PROTOCOL,
    LESION_PREFIX,
    NOSKILL_PREFIX,
    check_protocol,
    is_count,
    is_percent_metric,
)
from m2snet.files import write_json, write_text
from m2snet.mlops.cv_results import per_case_rows, write_cv_per_case

log = logging.getLogger("m2snet.workflows.cv_summary")

FOLD_INFO = "fold.json"  # in a task's evaluation report: which fold and seed, on which data and split

# The table's rows: (prefix of the fold-level metric names, what the row shows).
PREDICTORS = (("", ""), (NOSKILL_PREFIX, "no skill (all background)"))
SUBSETS = (("", "all cases", "n_cases"), (LESION_PREFIX, "lesion cases", "n_lesion_cases"))
CV_DESCRIPTION_HEADING = "### Cross-validation (percent, mean ± std over folds)"


@dataclass
class CVSummary:
    """mean +- std over folds (fractions in percent, MAE as a fraction, distances in pixels) of every
    metric present in all folds; ``counts`` (cases, lesion cases, NaN cases per metric) summed over folds."""

    n_folds: int
    folds: list[int]
    mean: dict[str, float]
    std: dict[str, float]
    counts: dict[str, int] = field(default_factory=dict)
    protocol: str = DEFAULT_PROTOCOL

    def table(self, columns: Sequence[tuple[str, str]] = BUSI_TABLE, title: str = "") -> str:
        """A Markdown table, the paper's BUSI columns: the model and the no-skill predictor (all
        background), each on all cases and on the lesion cases; a note for any metric NaN on a case."""
        distinct = len(set(self.folds)) or self.n_folds
        folds = f"{distinct} fold" + ("s" if distinct != 1 else "")
        if self.n_folds > distinct:  # a repeated CV: each fold once per seed
            folds += f" x {self.n_folds // distinct} seeds"
        head = "| " + " | ".join([f"{folds}, {self.protocol} protocol", *[c for c, _ in columns]]) + " |"
        lines = [head, "|" + "---|" * (len(columns) + 1)]
        for predictor, who in PREDICTORS:
            for subset, what, count in SUBSETS:
                keys = [predictor + subset + k for _, k in columns]
                if not any(k in self.mean for k in keys):
                    continue
                n = self.counts.get(count)
                label = f"{who or title or 'model'}: {what}" + (f" ({n})" if n is not None else "")
                cells = [f"{self.mean[k]:.2f} ± {self.std[k]:.2f}" if k in self.mean else "n/a" for k in keys]
                lines.append("| " + " | ".join([label, *cells]) + " |")
        for key, n in sorted(self.counts.items()):
            if "nan_" in key and n > 0:
                who = "no skill" if key.startswith(NOSKILL_PREFIX) else (title or "model")
                metric = key.split("nan_", 1)[1]
                lines.append(f"\n{who}: {metric} is NaN on {n} of {self.counts.get('n_cases', '?')} cases "
                             "(left out of its mean)")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {"n_folds": self.n_folds, "folds": self.folds, "metric_protocol": self.protocol,
                "mean_percent": self.mean, "std_percent": self.std, "counts": self.counts}

    def flat_metrics(self, prefix: str = "cv_") -> dict[str, float]:
        """``cv_<m>_mean/_std`` (the model), ``cv_<m>_noskill/_noskill_std`` (the all-background
        predictor), ``cv_lesion_<m>_...`` (lesion cases), ``cv_n_*`` (counts)."""
        out: dict[str, float] = {}
        for k, v in self.mean.items():
            if k.startswith(NOSKILL_PREFIX):
                name = k[len(NOSKILL_PREFIX):]
                out[f"{prefix}{name}_noskill"] = v
                out[f"{prefix}{name}_noskill_std"] = self.std[k]
            else:
                out[f"{prefix}{k}_mean"] = v
                out[f"{prefix}{k}_std"] = self.std[k]
        out.update({f"{prefix}{k}": float(v) for k, v in self.counts.items()})
        return out


def summarize_cv(per_fold: Sequence[Mapping[str, float]] | Sequence[Any],
                 folds: Sequence[int] | None = None, protocol: str = DEFAULT_PROTOCOL) -> CVSummary:
    """Mean +- std over folds of each metric (fractions in, percent out; MAE and distances as they are).

    Accepts fold results (``.fold`` and ``.metrics``, as :class:`m2snet.workflows.folds.FoldResult`) or plain
    metric dicts (e.g. read back from each fold's ``eval/metrics.json`` by a pipeline step). Counts
    (``n_cases``, ``n_nan_<m>``, ...) are summed.
    """

    rows = [dict(r) if isinstance(r, Mapping) else r.metrics for r in per_fold]
    if not rows:
        raise M2SNetError("summarize_cv: no fold results to aggregate")
    if folds is None:
        folds = [i if isinstance(r, Mapping) else r.fold for i, r in enumerate(per_fold)]
    keys = [k for k in rows[0] if k != "fold" and not is_count(k) and all(k in r for r in rows)]
    mean, std = {}, {}
    for k in keys:
        vals = np.array([float(r[k]) for r in rows])
        if is_percent_metric(k):
            vals = vals * 100.0
        mean[k] = float(np.nanmean(vals))
        std[k] = float(np.nanstd(vals, ddof=1)) if len(vals) > 1 else 0.0
    count_keys = sorted({k for r in rows for k in r if is_count(k)})
    counts = {k: int(sum(float(r.get(k, 0)) for r in rows)) for k in count_keys}
    return CVSummary(n_folds=len(rows), folds=list(folds), mean=mean, std=std, counts=counts,
                     protocol=check_protocol(protocol))


def report_cv(per_fold: Sequence[Mapping[str, float]], folds: Sequence[int], out_dir: str | os.PathLike, *,
              title: str, protocol: str = DEFAULT_PROTOCOL, parent=None,
              row_labels: Sequence[Mapping[str, Any]] | None = None,
              artifacts: Sequence[str | os.PathLike] = ()) -> CVSummary:
    """THE CV report, for ``m2snet cv`` and the pipeline alike: aggregate the folds' metric dicts, write
    ``cv_summary.json`` and ``cv_table.md`` (model and no-skill rows), and, with a ``parent`` run, log
    the ``cv_*`` metrics, the metric protocol, both files (and ``artifacts``, e.g. the per-case scores)
    and the table as the run's description. ``row_labels``: what identifies each row of ``per_fold``
    (default ``{"fold": k}``; a repeated CV adds its seed)."""
    summary = summarize_cv(per_fold, folds, protocol=protocol)
    labels = row_labels if row_labels is not None else [{"fold": k} for k in folds]
    write_cv_summary(summary, [{**dict(label), **dict(m)} for label, m in zip(labels, per_fold)], out_dir, title)
    table = summary.table(title=title)
    if parent is not None:
        parent.log_params({"metric_protocol": protocol})
        parent.log_metrics(summary.flat_metrics(), step=0, flush=True)
        for path in (Path(out_dir) / "cv_summary.json", Path(out_dir) / "cv_table.md", *artifacts):
            parent.log_artifact(path, "cv")
        parent.set_description(f"{CV_DESCRIPTION_HEADING}\n\n{table}")
    log.info("cross-validation (%s):\n%s", title, table)
    return summary




def write_cv_summary(summary: CVSummary, per_fold: Sequence[Mapping[str, Any]], out_dir: str | os.PathLike,
                     title: str) -> tuple[Path, Path]:
    """``cv_summary.json`` (per_fold: a list of {"fold", metrics...}) and ``cv_table.md`` in ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "cv_summary.json", {**summary.to_dict(), "per_fold": [dict(r) for r in per_fold]})
    write_text(out / "cv_table.md", summary.table(title=title) + "\n")
    return out / "cv_summary.json", out / "cv_table.md"


def read_fold_info(report: str | os.PathLike) -> dict[str, Any]:
    """Which fold and seed an evaluation report scored, on which data and split (:data:`FOLD_INFO`)."""
    info_path = Path(report) / FOLD_INFO
    if not info_path.is_file():
        raise M2SNetError(f"{report}: no {FOLD_INFO} (not an evaluate step's report)")
    return json.loads(info_path.read_text())


def collect_fold_reports(report_dirs: Sequence[str | os.PathLike], out_dir: str | os.PathLike) -> list[Path]:
    """The tasks' evaluation reports -> the CV's ``cv_per_case.csv`` + ``cv_lineage.json`` in ``out_dir``."""
    rows, infos = [], []
    for report in map(Path, report_dirs):
        info = read_fold_info(report)
        infos.append(info)
        rows += per_case_rows(report / "per_case.csv", info["fold"], info["seed"])
    for key in ("data_version", "split_sha256"):
        if len({i[key] for i in infos}) > 1:
            raise M2SNetError(f"the fold reports disagree on {key}: {sorted({i[key] for i in infos})}")
    lineage = {"data_version": infos[0]["data_version"], "split_sha256": infos[0]["split_sha256"],
               "seeds": sorted({i["seed"] for i in infos}, key=str), "folds": sorted({i["fold"] for i in infos})}
    return list(write_cv_per_case(rows, out_dir, lineage))


def report_tasks(fold_metrics: Sequence[Mapping[str, float]], report_dirs: Sequence[str | os.PathLike],
                 out_dir: str | os.PathLike, *, name: str, protocol: str = DEFAULT_PROTOCOL,
                 parent=None) -> CVSummary:
    """THE report of a CV's tasks, for ``m2snet cv`` and the pipeline's aggregate step alike: their metrics
    (in ``report_dirs``' order) -> :func:`report_cv`, titled ``name`` (+ `` (N seeds)``), a row per seed and
    fold when seeds repeat; their per-case scores -> ``cv_per_case.csv`` (:func:`collect_fold_reports`)."""
    rows = [{k: float(v) for k, v in m.items() if isinstance(v, (int, float))} for m in fold_metrics]
    per_case = collect_fold_reports(report_dirs, out_dir) if report_dirs else []
    infos = [read_fold_info(r) for r in report_dirs]
    seeds = {i["seed"] for i in infos}
    labels = [{**({"seed": i["seed"]} if len(seeds) > 1 else {}), "fold": i["fold"]} for i in infos] or None
    return report_cv(rows, [i["fold"] for i in infos] or list(range(len(rows))), out_dir,
                     title=name + (f" ({len(seeds)} seeds)" if len(seeds) > 1 else ""), protocol=protocol,
                     parent=parent, artifacts=per_case, row_labels=labels)
