"""The fold engine: the step functions of ONE task of a cross-validation, for every caller.

A CV is a list of (fold, seed) tasks (:mod:`m2snet.workflows.fold_tasks`). Each task goes through the
functions below, whoever runs it: ``m2snet cv`` / ``m2snet train`` in one process (:func:`run_fold`,
:func:`m2snet.workflows.cv.run_cv`), the pipeline one component per step (:mod:`m2snet.workflows.steps`):

- :func:`tune_task` -- nested tuning: an Optuna study on an inner split of the fold's TRAINING cases
  (duplicate groups kept on one side); the fold's validation cases are never read.
- :func:`train_task` -- train the fold as its MLflow run (:attr:`FoldTask.run_name`, a child of the CV's
  parent) and log its pyfunc model; the checkpoint is chosen by ``TrainConfig.selection`` (default: the
  final epoch), never on the cases the fold reports.
- :func:`evaluate_task` -- score that checkpoint on the fold's validation cases at their original sizes,
  on the fold's run, and say in the report which fold and seed it scored (:data:`FOLD_INFO`).

Tracking is attached here, not in the trainer: :func:`m2snet.mlops.training_run.tracking_callbacks` gives
``train`` the MLflow callback of a fold's run. That callback records the run id in
``<fold dir>/mlflow_run.json`` (``m2snet.mlops.tracking.write_run_file``), so a later step (the
evaluation, a resumed CV) reopens the same run (:func:`fold_run`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Mapping, Sequence

from m2snet.data.format import load_dataset
from m2snet.data.split import Split, load_split
from m2snet.errors import M2SNetError
from m2snet.evaluation.evaluate import EvalOptions, EvalResult, evaluate
from m2snet.files import write_json
from m2snet.hashing import sha256_file
from m2snet.mlops.lineage import DatasetLineage
from m2snet.mlops.pyfunc_logging import log_segmentation_model
from m2snet.mlops.tracking import RUN_FILE, Tracker, reopen_run
from m2snet.mlops.training_run import tracking_callbacks
from m2snet.training.config import SELECTED, TrainConfig
from m2snet.training.trainer import TrainResult, train
from m2snet.workflows.context import UNTRACKED, RunContext
from m2snet.workflows.cv_summary import FOLD_INFO
from m2snet.workflows.fold_tasks import FoldTask
from m2snet.workflows.presets import rate_params, settle_config
from m2snet.workflows.tuning import TuningConfig, TuningResult, tune

log = logging.getLogger("m2snet.workflows.folds")



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
    seed: int | None = None  # the seed it trained with


@dataclass(frozen=True)
class ScoreOptions(EvalOptions):
    """How a fold's checkpoint is scored: :class:`EvalOptions` (the metric ``protocol``, flip TTA, the
    S-measure etc., where and how fast), quiet by default (the fold's progress is the caller's)."""

    progress: bool = False


@dataclass(frozen=True)
class FoldOptions:
    """What ``m2snet cv`` / ``m2snet train`` ask of every task they run in one process.

    ``explicit``: the config fields the user set (they win over tuned values,
    :func:`m2snet.workflows.presets.settle_config`); ``tuning`` (a TuningConfig): nested tuning, one study
    per task; ``resume``: continue a task from its ``last.pt``; ``log_model``: the fold's pyfunc model
    (else its checkpoint as an artifact)."""

    explicit: frozenset[str] = frozenset()
    resume: bool = False
    log_model: bool = True
    tuning: TuningConfig | None = None
    score: ScoreOptions = ScoreOptions()


def fold_run(fold_dir: str | os.PathLike, tracking=None):
    """The fold's MLflow run, reopened from ``<fold_dir>/mlflow_run.json`` (None without one)."""

    return reopen_run(Path(fold_dir) / RUN_FILE, tracking)


def open_fold_run(ctx: RunContext, parent, task: FoldTask, fold_dir: str | os.PathLike | None = None):
    """The task's MLflow run (:attr:`FoldTask.run_name`): reopened from ``fold_dir`` (a resume), else a child
    of ``parent``, else a stand-alone run; None untracked. Use it with ``with``: it ends FINISHED, or FAILED
    on an error."""
    if not ctx.tracked:
        return None
    if fold_dir is not None:
        run = fold_run(fold_dir, ctx.tracking)
        if run is not None:
            return run
    if parent is not None:
        return parent.child(task.run_name, tags=task.tags)
    return Tracker.start(ctx.tracking, run_name=task.run_name, tags=task.tags)


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


def dataset_lineage(data: str | os.PathLike) -> DatasetLineage:
    """A dataset directory as an MLflow dataset input (a pipeline's parent logs the richer DVC source)."""
    info = load_dataset(data)
    return DatasetLineage(name=info.name, digest=info.version, uri=str(Path(data).resolve()), n_cases=len(info.cases))


def log_fold_lineage(run, parent, data: str | os.PathLike, split_path: str | os.PathLike, fold: int) -> None:
    """A fold run logs its CV's dataset input (the parent's, else the dataset directory's), tagged with
    the fold and the split file's hash: ``m2snet cv`` and the pipeline alike."""
    lineages = parent.dataset_inputs() if parent is not None else []
    split_sha = sha256_file(split_path)
    for lineage in lineages or [dataset_lineage(data)]:
        run.log_dataset(lineage, tags={"fold": fold, "split_sha256": split_sha})


def log_fold_model(run, checkpoint: str | os.PathLike, *, tta_flip: bool = False) -> str:
    """The fold's pyfunc model (it carries model.pt as its artifact "checkpoint_0": not uploaded twice)."""
    info = log_segmentation_model([checkpoint], name="model", run_id=run.run_id,
                                  tracking_uri=run.cfg.resolved_uri(), tta_flip=tta_flip)
    run.set_tags({"m2snet.model_uri": info.model_uri})
    return info.model_uri


def fit_fold(cfg: TrainConfig, fold: int, fold_dir: str | os.PathLike, *, tracker=None, resume: bool = False,
             tuned: Mapping[str, float] | None = None, explicit: frozenset[str] = frozenset(),
             parent=None) -> TrainResult:
    """Train fold ``fold`` into ``fold_dir`` with the precedence of
    :func:`m2snet.workflows.presets.settle_config` (preset < ``tuned`` < the ``explicit`` fields); log the
    rates and their source, the selection rule, the dataset lineage and the training artifacts."""
    if not cfg.split:
        raise M2SNetError("cross-validation needs a split file (--split)")
    settled, sources = settle_config(cfg, tuned, explicit)
    fold_cfg = settled.override(fold=fold, out_dir=str(fold_dir))
    result = train(fold_cfg, resume=resume, callbacks=tracking_callbacks(tracker))
    if not result.val_cases:
        raise M2SNetError(f"{cfg.split}: fold {fold} has no validation cases")
    if tracker is not None:
        tracker.set_tags({"m2snet.selection": fold_cfg.selection, "m2snet.selected_epoch": result.selected_epoch})
        tracker.log_params(rate_params(fold_cfg, sources))
        log_fold_lineage(tracker, parent, fold_cfg.data, fold_cfg.split, fold)
        log_training_artifacts(tracker, fold_dir)
    return result


def score_fold(checkpoint: str | os.PathLike, data: str | os.PathLike, val_cases: Sequence[str],
               out_dir: str | os.PathLike, *, tracker=None, step: int = 0,
               options: ScoreOptions = ScoreOptions()) -> EvalResult:
    """Evaluate ``checkpoint`` (and the no-skill predictor) on the fold's validation cases at their original
    sizes under ``options``; log to ``tracker``."""
    ev = evaluate([checkpoint], data, case_ids=list(val_cases), out_dir=out_dir, options=options)
    if tracker is not None:
        tracker.log_params({"metric_protocol": options.protocol})
        log_evaluation(tracker, ev, step=step)
    return ev


# --- the step functions of one task -----------------------------------------------------------------


def tune_task(cfg: TrainConfig, task: FoldTask, tuning: TuningConfig, out_dir: str | os.PathLike,
              ctx: RunContext = UNTRACKED) -> TuningResult:
    """Nested tuning of the task's fold: the study's objective is an inner split of the fold's training
    cases; its run ``[seed-S-]tune-fold-K`` is a child of the CV's parent. Its ``best_params`` are
    TrainConfig fields."""
    return tune(task.config(cfg).override(fold=task.fold), tuning, out_dir, parent=ctx.parent(),
                tracking=ctx.tracked, seed_tag=task.seed_tag)


@dataclass
class TrainedFold:
    """What :func:`train_task` made: the trainer's result, the fold's run and its pyfunc model."""

    result: TrainResult
    run_id: str | None = None
    model_uri: str | None = None


def train_task(cfg: TrainConfig, task: FoldTask, fold_dir: str | os.PathLike, *, ctx: RunContext = UNTRACKED,
               tuned: Mapping[str, float] | None = None, options: FoldOptions = FoldOptions()) -> TrainedFold:
    """Train the task's fold into ``fold_dir`` (the task's seed, ITS tuned rates) as the fold's run, a child
    of the CV's parent; log its pyfunc model there (``options.log_model``, else the checkpoint). The run
    ends FINISHED here (FAILED/KILLED on an error); :func:`evaluate_task` reopens it."""
    parent = ctx.parent()
    run = open_fold_run(ctx, parent, task, fold_dir=fold_dir if options.resume else None)
    with run or contextlib.nullcontext():
        result = fit_fold(task.config(cfg), task.fold, fold_dir, tracker=run, resume=options.resume, tuned=tuned,
                          explicit=options.explicit, parent=parent)
        trained = TrainedFold(result, run.run_id if run is not None else None)
        if run is not None and options.log_model:
            trained.model_uri = log_fold_model(run, result.checkpoint, tta_flip=options.score.tta_flip)
        elif run is not None:
            run.log_artifact(result.checkpoint, "checkpoints")
    return trained


def fold_checkpoint(model_dir: str | os.PathLike) -> Path:
    """The checkpoint a training step chose, in its output directory."""
    path = Path(model_dir) / SELECTED
    if not path.is_file():
        raise M2SNetError(f"{model_dir}: no {SELECTED} checkpoint (the training step's Model artifact)")
    return path


def evaluate_task(model_dir: str | os.PathLike, data: str | os.PathLike, split: Split, fold: int,
                  out_dir: str | os.PathLike, *, cases: Sequence[str] | None = None, run=None, step: int = 0,
                  options: ScoreOptions = ScoreOptions()) -> EvalResult:
    """Score the fold's selected checkpoint (and the no-skill predictor) on its validation cases (original
    size; ``cases``: those the training run held out, when it capped them) under ``options``; log to ``run``
    (the fold's, reopened: :func:`fold_run`).

    The report (``out_dir``) also says which fold, seed, data version and split it scored
    (:data:`FOLD_INFO`): the CV's report joins the folds' per-case CSVs with it."""
    config_file = Path(model_dir) / "train_config.json"
    config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    ev = score_fold(fold_checkpoint(model_dir), data, split.fold(fold).val if cases is None else cases, out_dir,
                    tracker=run, step=step, options=options)
    write_json(Path(out_dir) / FOLD_INFO, {"fold": fold, "seed": config.get("seed"), "split_sha256": split.sha256,
                                           "data_version": load_dataset(data).version})
    return ev


def run_fold(cfg: TrainConfig, task: FoldTask, fold_dir: str | os.PathLike, *, ctx: RunContext = UNTRACKED,
             split: Split | None = None, options: FoldOptions = FoldOptions(), cv_key: str | None = None) -> FoldResult:
    """ONE task in one process, through the pipeline's step functions: tune (with ``options.tuning``) ->
    train -> evaluate, into ``fold_dir`` (``fold_result.json``: what it chose and scored). ``split``:
    ``cfg.split``, loaded (the caller's, when it has it); ``cv_key``: the CV the task belongs to
    (:func:`m2snet.workflows.cv.cv_key`), recorded so that a CV's report merges only its own tasks."""
    if not cfg.split:
        raise M2SNetError("cross-validation needs a split file (--split)")
    split = split or load_split(cfg.split, load_dataset(cfg.data), accept_version=cfg.accept_split_version)
    fold_dir = Path(fold_dir)
    options = replace(options, resume=options.resume and (fold_dir / "last.pt").is_file())
    tuned: dict[str, float] = {}
    if options.tuning is not None and not options.resume:
        tuned = tune_task(cfg, task, options.tuning, fold_dir.with_name(fold_dir.name + "-tune"), ctx).best_params
    trained = train_task(cfg, task, fold_dir, ctx=ctx, tuned=tuned, options=options)
    result = trained.result
    score = replace(options.score, device=result.device, batch_size=max(1, cfg.batch_size), progress=cfg.progress)
    with (fold_run(fold_dir, ctx.tracking) if trained.run_id else None) or contextlib.nullcontext() as run:
        ev = evaluate_task(fold_dir, cfg.data, split, task.fold, fold_dir / "eval", cases=result.val_cases, run=run,
                           step=cfg.epochs, options=score)
    fr = FoldResult(fold=task.fold, metrics=ev.metrics, out_dir=fold_dir, checkpoint=result.checkpoint,
                    selected_epoch=result.selected_epoch, per_case_csv=ev.per_case_csv, overlay_png=ev.overlay_png,
                    learning_curves_png=fold_dir / "learning_curves.png", history=result.history,
                    run_id=trained.run_id, model_uri=trained.model_uri, tuned=tuned, seed=result.config.seed)
    write_json(fold_dir / "fold_result.json", {"fold": task.fold, "seed": fr.seed, "cv_key": cv_key,
                                               "metrics": fr.metrics, "run_id": fr.run_id,
                                               "model_uri": fr.model_uri, "checkpoint": str(fr.checkpoint),
                                               "selection": cfg.selection, "selected_epoch": fr.selected_epoch,
                                               "tuned": tuned,
                                               "pretrained_source": result.pretrained_source or "none (random init)"})
    return fr
