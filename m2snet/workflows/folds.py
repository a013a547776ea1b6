"""The fold engine: how ONE fold is tuned, trained and scored, for every caller.

The CLI (``m2snet train`` / ``m2snet cv``), the pipeline's steps and ``bench/busi_cv.py`` all go
through the functions below, so each rule lives in one place:

- :func:`tune_fold` -- nested tuning: an Optuna study on an inner split of the fold's TRAINING
  cases (duplicate groups kept on one side); the fold's validation cases are never read.
- :func:`fit_fold` -- train the fold; the checkpoint is chosen by ``TrainConfig.selection``
  (default: the final epoch), never on the cases the fold reports.
- :func:`score_fold` -- evaluate that checkpoint on the fold's validation cases at their original
  sizes and log the result to the fold's MLflow run.
- :func:`train_fold` = tune (optional) + fit + score + the fold's pyfunc model; :func:`run_cv`
  runs it for every fold under one parent run; :func:`aggregate_cv` turns per-fold metrics into
  mean +- std in percent (sample std, ddof=1; 0 for a single fold).

Tracking is attached here, not in the trainer: :func:`m2snet.mlops.tracking.tracking_callbacks`
gives ``train`` the MLflow callback of a fold's run. That callback records the run id in ``<fold dir>/mlflow_run.json``
(``m2snet.mlops.tracking.write_run_file``), so a later step (the pipeline's evaluate task, a resumed
CV) reopens the same run (:func:`fold_run`).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from m2snet.common import M2SNetError, git_commit, write_json
from m2snet.data.format import load_dataset
from m2snet.data.split import load_split
from m2snet.evaluation.metrics import BUSI_TABLE, is_distance_metric
from m2snet.evaluation.plots import cv_learning_curves
from m2snet.mlops.tracking import (
    PARENT_RUN_FILE,
    RUN_FILE,
    Tracker,
    read_run_file,
    reopen_run,
    tracking_callbacks,
    write_run_file,
)
from m2snet.training.config import TrainConfig
from m2snet.workflows.tuning import tune

log = logging.getLogger("m2snet.workflows.folds")

# The paper's Tab. 4 (BUSI, M2SNet), in percent: (mean, std).

PAPER_BUSI_M2SNET = {"iou": (71.52, 1.19), "precision": (84.00, 0.55), "recall": (79.97, 1.65),
                     "specificity": (98.35, 0.20), "dice": (79.21, 1.28)}


@dataclass
class FoldResult:
    fold: int
    metrics: dict[str, float]  # per-image means on the fold's validation cases (fractions, not %)
    out_dir: Path
    checkpoint: Path  # model.pt: the checkpoint the selection rule chose
    selected_epoch: int
    per_case_csv: Path | None = None
    overlay_png: Path | None = None
    learning_curves_png: Path | None = None
    history: list[dict] = field(default_factory=list, repr=False)
    run_id: str | None = None
    model_uri: str | None = None
    tuned: dict[str, float] = field(default_factory=dict)


@dataclass
class CVSummary:
    """mean +- std over folds, in percent, for every metric present in all folds."""

    n_folds: int
    folds: list[int]
    mean: dict[str, float]
    std: dict[str, float]

    def table(self, columns: Sequence[tuple[str, str]] = BUSI_TABLE, title: str = "") -> str:
        """A Markdown table: one row, the paper's BUSI columns."""
        head = "| " + " | ".join(["", *[c for c, _ in columns]]) + " |"
        sep = "|" + "---|" * (len(columns) + 1)
        row = "| " + " | ".join([title or f"{self.n_folds} folds",
                                 *[f"{self.mean[k]:.2f} ± {self.std[k]:.2f}" if k in self.mean else "n/a"
                                   for _, k in columns]]) + " |"
        return "\n".join([head, sep, row])

    def to_dict(self) -> dict[str, Any]:
        return {"n_folds": self.n_folds, "folds": self.folds, "mean_percent": self.mean, "std_percent": self.std}

    def flat_metrics(self, prefix: str = "cv_") -> dict[str, float]:
        out = {f"{prefix}{k}_mean": v for k, v in self.mean.items()}
        out.update({f"{prefix}{k}_std": v for k, v in self.std.items()})
        return out


def aggregate_cv(per_fold: Sequence[Mapping[str, float]] | Sequence[FoldResult],
                 folds: Sequence[int] | None = None) -> CVSummary:
    """Mean +- std (percent) over folds of each metric (fractions in, percent out).

    Accepts FoldResult objects or plain metric dicts (e.g. read back from each fold's
    ``eval/metrics.json`` by a pipeline step). ``n_cases`` and other counts are not aggregated.
    """

    rows = [r.metrics if isinstance(r, FoldResult) else dict(r) for r in per_fold]
    if not rows:
        raise M2SNetError("aggregate_cv: no fold results to aggregate")
    if folds is None:
        folds = [r.fold if isinstance(r, FoldResult) else i for i, r in enumerate(per_fold)]
    keys = [k for k in rows[0] if k not in ("n_cases", "fold") and all(k in r for r in rows)]
    mean, std = {}, {}
    for k in keys:
        vals = np.array([float(r[k]) for r in rows])
        if not is_distance_metric(k):  # fractions in percent; pixel distances as they are
            vals = vals * 100.0
        mean[k] = float(np.nanmean(vals))
        std[k] = float(np.nanstd(vals, ddof=1)) if len(vals) > 1 else 0.0
    return CVSummary(n_folds=len(rows), folds=list(folds), mean=mean, std=std)


def fold_run(fold_dir: str | os.PathLike, tracking=None):
    """The fold's MLflow run, reopened from ``<fold_dir>/mlflow_run.json`` (None without one)."""

    return reopen_run(Path(fold_dir) / RUN_FILE, tracking)


def fold_tags(fold: int) -> dict[str, str]:
    return {"m2snet.fold": str(fold), "m2snet.kind": "fold"}


def _fold_tracker(parent, tracking, fold_dir: Path, fold: int, resume: bool):
    if resume:
        run = fold_run(fold_dir, parent.cfg if parent else tracking)
        if run is not None:
            return run
    if parent is not None:
        return parent.child(f"fold-{fold}", tags=fold_tags(fold))
    if tracking is not None:

        return Tracker.start(tracking, run_name=f"fold-{fold}", tags=fold_tags(fold))
    return None


TRAINING_ARTIFACTS = ("history.json", "train_config.json", "learning_curves.png")


def log_training_artifacts(tracker, run_dir: str | os.PathLike) -> None:
    """The trainer's history, resolved config and learning curves of ``run_dir`` -> artifacts ``train/``."""
    for name in TRAINING_ARTIFACTS:
        path = Path(run_dir) / name
        if path.is_file():
            tracker.log_artifact(path, "train")


def log_evaluation(tracker, ev, step: int = 0) -> None:
    """An evaluation's metrics (as ``final_<m>`` and under the paper's plain names, so runs compare on
    ``dice``, ``iou``, ... directly) and its per-case CSV, metrics JSON and overlays -> ``eval/``."""
    tracker.log_metrics({f"final_{k}": v for k, v in ev.metrics.items()}, step=step)
    tracker.log_metrics(dict(ev.metrics), step=step, flush=True)
    for path in (ev.per_case_csv, ev.metrics_json, ev.overlay_png):
        if path is not None and Path(path).is_file():
            tracker.log_artifact(path, "eval")


def tune_fold(cfg: TrainConfig, fold: int, tuning, out_dir: str | os.PathLike, *, parent=None,
              tracking: bool = True):
    """Nested tuning of fold ``fold``: the study's objective is an inner split of the fold's training cases.

    Returns the :class:`m2snet.workflows.tuning.TuningResult`; its ``best_params`` are TrainConfig fields.
    """

    return tune(cfg.override(fold=fold), tuning, out_dir, parent=parent, tracking=tracking)


def fit_fold(cfg: TrainConfig, fold: int, fold_dir: str | os.PathLike, *, tracker=None, resume: bool = False,
             tuned: Mapping[str, float] | None = None):
    """Train fold ``fold`` into ``fold_dir``; ``tuned`` values (the fold's study's best) replace the config's."""
    from m2snet.training.trainer import train

    if not cfg.split:
        raise M2SNetError("cross-validation needs a split file (--split)")
    fold_cfg = cfg.override(**dict(tuned or {})).override(fold=fold, out_dir=str(fold_dir))
    result = train(fold_cfg, resume=resume, callbacks=tracking_callbacks(tracker))
    if not result.val_cases:
        raise M2SNetError(f"{cfg.split}: fold {fold} has no validation cases")
    if tracker is not None:
        tracker.set_tags({"m2snet.selection": fold_cfg.selection, "m2snet.selected_epoch": result.selected_epoch})
        if tuned:
            tracker.log_params({"tuned": dict(tuned)})
        log_training_artifacts(tracker, fold_dir)
    return result


def score_fold(checkpoint: str | os.PathLike, data: str | os.PathLike, val_cases: Sequence[str],
               out_dir: str | os.PathLike, *, tracker=None, step: int = 0, tta_flip: bool = False,
               device: str = "auto", batch_size: int = 8, with_sod: bool = True, progress: bool = False):
    """Evaluate ``checkpoint`` on the fold's validation cases at their original sizes; log to ``tracker``."""
    from m2snet.evaluation.evaluate import evaluate

    ev = evaluate([checkpoint], data, case_ids=list(val_cases), out_dir=out_dir, tta_flip=tta_flip,
                  device=device, batch_size=batch_size, with_sod=with_sod, progress=progress)
    if tracker is not None:
        log_evaluation(tracker, ev, step=step)
    return ev


def train_fold(
    cfg: TrainConfig,
    fold: int,
    out_dir: str | os.PathLike,
    *,
    parent=None,
    tracking=None,
    resume: bool = False,
    log_model: bool = True,
    tta_flip: bool = False,
    with_sod: bool = True,
    fold_dir: str | os.PathLike | None = None,
    tuning=None,
) -> FoldResult:
    """Tune (with ``tuning``, a TuningConfig), train and score fold ``fold`` of ``cfg.split`` in ``out_dir/fold<k>``.

    ``parent``: a :class:`m2snet.mlops.tracking.Tracker` of the CV (the fold becomes a child run);
    ``tracking``: a TrackingConfig for a stand-alone fold run; neither = no tracking.
    ``fold_dir`` overrides the output directory (``m2snet train`` writes exactly to ``--out``).
    """
    if not cfg.split:
        raise M2SNetError("cross-validation needs a split file (--split)")
    fold_dir = Path(fold_dir) if fold_dir is not None else Path(out_dir) / f"fold{fold}"
    resume = resume and (fold_dir / "last.pt").is_file()
    tuned: dict[str, float] = {}
    if tuning is not None and not resume:
        tuned = tune_fold(cfg, fold, tuning, fold_dir.with_name(fold_dir.name + "-tune"), parent=parent,
                          tracking=parent is not None or tracking is not None).best_params
    tracker = _fold_tracker(parent, tracking, fold_dir, fold, resume)
    try:
        result = fit_fold(cfg, fold, fold_dir, tracker=tracker, resume=resume, tuned=tuned)
        ev = score_fold(result.checkpoint, cfg.data, result.val_cases, fold_dir / "eval", tracker=tracker,
                        step=cfg.epochs, tta_flip=tta_flip, device=result.device,
                        batch_size=max(1, cfg.batch_size), with_sod=with_sod, progress=cfg.progress)
        fr = FoldResult(fold=fold, metrics=ev.metrics, out_dir=fold_dir, checkpoint=result.checkpoint,
                        selected_epoch=result.selected_epoch, per_case_csv=ev.per_case_csv,
                        overlay_png=ev.overlay_png, learning_curves_png=fold_dir / "learning_curves.png",
                        history=result.history, tuned=tuned)
        if tracker is not None:
            fr.run_id = tracker.run_id
            if not log_model:
                tracker.log_artifact(result.checkpoint, "checkpoints")
            else:
                # The pyfunc model carries model.pt as its artifact "checkpoint_0": not uploaded twice.
                from m2snet.mlops.pyfunc import log_segmentation_model

                info = log_segmentation_model([result.checkpoint], name="model", run_id=tracker.run_id,
                                              tracking_uri=tracker.cfg.resolved_uri(), tta_flip=tta_flip)
                fr.model_uri = info.model_uri
                tracker.set_tags({"m2snet.model_uri": info.model_uri})
        write_json(fold_dir / "fold_result.json", {"fold": fold, "metrics": fr.metrics, "run_id": fr.run_id,
                                                   "model_uri": fr.model_uri, "checkpoint": str(fr.checkpoint),
                                                   "selection": cfg.selection,
                                                   "selected_epoch": fr.selected_epoch, "tuned": tuned})
    except BaseException:
        if tracker is not None:
            tracker.__exit__(RuntimeError, None, None)
        raise
    if tracker is not None:
        tracker.end("FINISHED")
    return fr


def write_cv_summary(summary: CVSummary, per_fold: Sequence[Mapping[str, Any]], out_dir: str | os.PathLike,
                     title: str) -> tuple[Path, Path]:
    """``cv_summary.json`` (per_fold: a list of {"fold", metrics...}) and ``cv_table.md`` in ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "cv_summary.json", {**summary.to_dict(), "per_fold": [dict(r) for r in per_fold]})
    (out / "cv_table.md").write_text(summary.table(title=title) + "\n")
    return out / "cv_summary.json", out / "cv_table.md"


@dataclass
class CVResult:
    summary: CVSummary
    folds: list[FoldResult]
    out_dir: Path
    parent_run_id: str | None = None


def run_cv(
    cfg: TrainConfig,
    out_dir: str | os.PathLike,
    folds: Sequence[int] | None = None,
    *,
    tracking=None,
    run_name: str | None = None,
    parent_run_id: str | None = None,
    resume: bool = False,
    log_models: bool = True,
    tta_flip: bool = False,
    with_sod: bool = True,
    tuning=None,
) -> CVResult:
    """Train + evaluate the listed folds (default: all) under one parent run; print the table.

    ``tuning`` (a TuningConfig): nested tuning, one study per fold on that fold's inner split.
    """

    if not cfg.split:
        raise M2SNetError("cross-validation needs a split file (--split)")
    split = load_split(cfg.split)
    if split.is_fixed:
        raise M2SNetError(f"{split.path}: a fixed split (named test sets), not k folds; "
                          "run it with `m2snet train --split` or `m2snet benchmark`")
    folds = list(range(split.n_folds)) if folds is None else list(folds)
    for k in folds:
        split.fold(k)  # range check with a clear error
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    parent = None
    if tracking is not None:
        if parent_run_id is None and resume:
            parent_run_id = read_run_file(out / PARENT_RUN_FILE)
        parent = (Tracker.start(tracking, run_id=parent_run_id) if parent_run_id else
                  Tracker.start(tracking, run_name=run_name or f"cv-{cfg.model}", tags={"m2snet.kind": "cv"}))
        write_run_file(out / PARENT_RUN_FILE, parent)

        # The children record what actually happened (pretrained source, device); the parent
        # records the shared inputs.
        parent.log_params({**{f"config.{k}": v for k, v in cfg.to_dict().items()},
                           "data_version": load_dataset(cfg.data).version, "split_sha256": split.sha256,
                           "git_commit": git_commit(), "seed": cfg.seed, "n_folds": split.n_folds,
                           "folds": ",".join(map(str, folds)), "selection": cfg.selection,
                           "split_group": split.group,
                           "tuning": "nested per fold" if tuning is not None else "none"})
    results: list[FoldResult] = []
    try:
        for k in folds:
            log.info("=== fold %d (%d of %d) ===", k, len(results) + 1, len(folds))
            results.append(train_fold(cfg, k, out, parent=parent, resume=resume, log_model=log_models,
                                      tta_flip=tta_flip, with_sod=with_sod, tuning=tuning))
        summary = aggregate_cv(results)
        write_cv_summary(summary, [{"fold": r.fold, **r.metrics} for r in results], out, cfg.model)
        curves = cv_learning_curves({r.fold: r.history for r in results}, out / "cv_learning_curves.png",
                                    title=f"{cfg.model}: {len(results)} folds")
        if parent is not None:
            parent.log_metrics(summary.flat_metrics(), step=0, flush=True)
            for path in (out / "cv_summary.json", out / "cv_table.md", curves):
                parent.log_artifact(path, "cv")
    except BaseException as err:
        if parent is not None:
            parent.__exit__(type(err), err, None)
        raise
    if parent is not None:
        parent.end("FINISHED")
    log.info("cross-validation (%s):\n%s", cfg.model, summary.table(title=cfg.model))
    return CVResult(summary=summary, folds=results, out_dir=out, parent_run_id=parent.run_id if parent else None)
