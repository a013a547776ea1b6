"""The pipeline's step functions: one per Kubeflow component, plain Python over the library.

Each component (``m2snet.kubeflow.components``) calls exactly one function below; so does the
local run (through the kfp local runner, running the very same components). Every step takes the
pipeline run's :class:`m2snet.workflows.context.RunContext` (``RunContext.for_pipeline``). Steps
communicate through files (the kfp artifacts' paths) and through MLflow, where every step of one
pipeline run finds the run's PARENT MLflow run through ``ctx.parent()`` (by the tag
``m2snet.pipeline_run_id``; looked up or created: idempotent, so a retried step never opens a second
parent). The CV is the task list of :func:`m2snet.workflows.fold_tasks.fold_tasks` (the split step
returns it) and each task goes through the step functions of :mod:`m2snet.workflows.folds`, as in
``m2snet cv`` (:mod:`m2snet.workflows.cv`): the same seed rule, run names, precedence, lineage, per-fold
model and selection record, so both record the same run tree:

    parent run "pipeline-<id>"    params: preset, data version, split hash; metrics: cv_*; artifacts: cv/
      +- "tune-fold-K"            each fold's Optuna study; plots
      |    +- "trial-0", ...      one per trial, per-epoch val Dice
      +- "fold-0" .. "fold-3"     training (per epoch) + evaluation at original size; artifacts; model
      |                           (with several ``seeds``: "seed-S-tune-fold-K" and "seed-S-fold-K", one
      |                           per seed and fold)
    registered model <name>       one version per pipeline run: the folds' ensemble pyfunc

Nothing here imports kfp: the Kubeflow side sits above this layer.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from m2snet.data.format import load_dataset
from m2snet.data.grouping import grouping_note
from m2snet.data.split import load_split, make_split
from m2snet.evaluation.guard import GUARD_FILE, MIN_CALIBRATION_CASES, calibration_sizes, fit_guard
from m2snet.evaluation.metrics import DEFAULT_PROTOCOL
from m2snet.evaluation.predict import Predictor
from m2snet.files import write_json
from m2snet.hashing import sha256_file
from m2snet.mlops.mlflow_store import TrackingConfig
from m2snet.mlops.promotion_gate import NOSKILL_TAG, SCORE_TAG, PromotionPolicy
from m2snet.mlops.pyfunc_logging import log_segmentation_model
from m2snet.mlops.registry import find_version_by_key, promote, register_model_version
from m2snet.mlops.tracking import Tracker, iter_child_runs
from m2snet.mlops.version_description import describe_version
from m2snet.models.checkpoint import Checkpoint
from m2snet.training.config import SELECTED
from m2snet.workflows.context import UNTRACKED, RunContext
from m2snet.workflows.cv import split_params
from m2snet.workflows.cv_summary import CV_DESCRIPTION_HEADING, report_tasks
from m2snet.workflows.fold_tasks import NO_SEED, FoldTask, fold_tasks, loop_item, loop_items, parse_seeds
from m2snet.workflows.folds import (
    FoldOptions,
    ScoreOptions,
    evaluate_task,
    fold_checkpoint,
    fold_run,
    train_task,
    tune_task,
)
from m2snet.workflows.prepare import prepare_dataset
from m2snet.workflows.presets import get_preset, parse_overrides, train_config

log = logging.getLogger("m2snet.workflows.steps")

# Named through this module by the components and the local runner: the prepare step (in its own module),
# the run context, and the fold loop's seeds and console names (m2snet.workflows.fold_tasks).
__all__ = ["NO_SEED", "RunContext", "loop_item", "loop_items", "parse_seeds", "prepare_dataset"]

def split_dataset(dataset_dir: str | os.PathLike, out_path: str | os.PathLike, n_folds: int, seed: int, *,
                  seeds: str = "", ctx: RunContext = UNTRACKED) -> list[dict[str, int]]:
    """Write the K-fold split file and record its hash (and the seeds) on the pipeline's run; return the
    CV's tasks (:func:`m2snet.workflows.fold_tasks.fold_tasks`) to fan out over: ``{"fold": k, "seed": s}``
    per seed of ``seeds`` and fold, the same split for every seed (``seed`` :data:`NO_SEED` without
    ``seeds``: the config's own).

    The hash is logged here, once, and not by each fold: parallel folds logging the same parameter
    race in the tracking store (SQLite answered one of them with a UNIQUE-constraint error).
    """
    info = load_dataset(dataset_dir)
    # The dataset's own grouping (CVC-ClinicDB's sequences) by default, said in the task's log.
    split = make_split(info, n_folds=n_folds, seed=seed, out=out_path)
    log.info("%s", grouping_note(info, split.group_by))
    parent = ctx.parent()
    if parent is not None:
        parent.log_params(split_params(split, parse_seeds(seeds)))
    return [task.as_item() for task in fold_tasks(range(split.n_folds), parse_seeds(seeds))]


def tune_step(
    dataset_dir: str,
    split_path: str,
    out_path: str,
    *,
    preset: str,
    train_overrides: str = "{}",
    n_trials: int = -1,
    storage: str = "",
    task: Mapping[str, Any] | None = None,
    ctx: RunContext = UNTRACKED,
    workdir: str | None = None,
) -> str:
    """Nested tuning of ONE task (``task``: its loop item's ``fold`` and ``seed`` and the pipeline's ``seeds``;
    default fold 0): a study on an inner split of the fold's training cases; write its best params.

    The pipeline runs one per task, inside the fold loop, so no fold is scored on cases that took
    part in choosing its learning rates.
    """

    p = get_preset(preset)
    fold_task = FoldTask.in_pipeline(**{"fold": 0, **(task or {})})
    work = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="m2snet-tune-"))
    cfg = train_config(preset, train_overrides, data=dataset_dir, split=split_path, out_dir=str(work / "unused"))
    storage = storage or os.environ.get("M2SNET_OPTUNA_STORAGE", "")
    study = (f"m2snet-{ctx.pipeline_run_id}-fold{fold_task.fold}" if ctx.pipeline_run_id
             else f"m2snet-fold{fold_task.fold}") + (f"-seed{fold_task.seed}" if fold_task.seed != NO_SEED else "")
    # One study per pipeline run unless the caller shares a named storage on purpose.
    tuning = p.tuning_config(n_trials=n_trials if n_trials > 0 else p.n_trials, storage=storage or None,
                             seed=fold_task.config(cfg).seed, study_name=study)
    try:
        result = tune_task(cfg, fold_task, tuning, work, ctx)
    finally:
        if not workdir:
            shutil.rmtree(work, ignore_errors=True)
    write_json(out_path, result.to_dict())
    return json.dumps(result.best_params)


def train_fold_step(
    dataset_dir: str,
    split_path: str,
    fold: int,
    best_params_path: str,
    out_dir: str,
    *,
    preset: str,
    train_overrides: str = "{}",
    seed: int = NO_SEED,
    seeds: str = "",
    ctx: RunContext = UNTRACKED,
) -> dict[str, Any]:
    """Train fold ``fold`` (one ``seed`` of the pipeline's ``seeds``) with ITS tuned learning rates as a child
    run of the parent (:func:`m2snet.workflows.folds.train_task`, as ``m2snet cv``); checkpoint in ``out_dir``."""

    tuned = json.loads(Path(best_params_path).read_text())["best_params"] if best_params_path else {}
    # last.pt (optimizer + RNG state) only serves --resume inside this pod: the trainer removes it at the
    # end, it is not shipped.
    cfg = train_config(preset, train_overrides, data=dataset_dir, split=split_path, fold=fold, out_dir=out_dir,
                       keep_last_checkpoint=False)
    trained = train_task(cfg, FoldTask.in_pipeline(fold, seed, seeds), out_dir, ctx=ctx, tuned=tuned,
                         options=FoldOptions(explicit=frozenset(parse_overrides(train_overrides))))
    result = trained.result
    last_row = result.history[-1] if result.history else {}
    return {
        "model_metadata": {"fold": fold, "seed": result.config.seed, "checkpoint": SELECTED,
                           "run_id": trained.run_id or "",
                           "selection": result.config.selection, "selected_epoch": result.selected_epoch,
                           "dataset_version": result.dataset_version, "split_sha256": result.split_sha256,
                           "pretrained": result.pretrained_source or "none"},
        "metrics": {k: float(v) for k, v in last_row.items() if k.startswith("val_")},
        "checkpoint": str(result.checkpoint),
    }


@dataclass
class FittedGuard:
    path: Path
    rates: dict


def fit_input_guard(checkpoints: Sequence[Path], data: str, split_path: str, out_dir: Path,
                    min_calibration: int | None = None) -> FittedGuard | None:
    """The ensemble's input guard (m2snet.evaluation.guard.fit_guard) in ``out_dir``; None, with a warning, for
    checkpoints that do not record their fold (the guard needs each model's own held-out cases) or folds with
    fewer than ``min_calibration`` (default MIN_CALIBRATION_CASES) cases to set a threshold on."""

    folds = [Checkpoint.load(c).fold for c in checkpoints]
    if any(k is None for k in folds):
        log.warning("no input guard: %s do not all record their fold", ", ".join(map(str, checkpoints)))
        return None
    info = load_dataset(data)
    split = load_split(split_path, dataset=info)
    needed = MIN_CALIBRATION_CASES if min_calibration is None else min_calibration
    fewest = min(calibration_sizes(split, folds))
    if fewest < needed:
        log.warning("no input guard: a fold has %d held-out cases to set its threshold on, fewer than the %d it "
                    "needs (a larger dataset gets one)", fewest, needed)
        return None
    fit = fit_guard(Predictor.from_checkpoints(checkpoints), info, split, folds)
    log.info("input guard: %.1f %% of %d held-out cases flagged (threshold: quantile %.3f)",
             100 * fit.held_out_flag_rate(), fit.guard.rates["held_out_cases"], fit.guard.quantile)
    return FittedGuard(fit.guard.save(out_dir / GUARD_FILE), dict(fit.guard.rates, quantile=fit.guard.quantile))


def evaluate_fold_step(dataset_dir: str, split_path: str, fold: int, model_dir: str, out_dir: str,
                       metric_protocol: str = DEFAULT_PROTOCOL) -> dict[str, float]:
    """Score the fold's selected checkpoint (and the no-skill predictor) on its validation cases (original
    size) under ``metric_protocol``, on the fold's run (:func:`m2snet.workflows.folds.evaluate_task`, as
    ``m2snet cv``); the report says which fold and seed it scored."""

    train_config_file = Path(model_dir) / "train_config.json"
    config = json.loads(train_config_file.read_text()) if train_config_file.is_file() else {}
    # The same check as the fold's training (and the same by-name acceptance, from its config).
    split = load_split(split_path, load_dataset(dataset_dir), accept_version=config.get("accept_split_version"))
    with fold_run(model_dir) or contextlib.nullcontext() as run:
        ev = evaluate_task(model_dir, dataset_dir, split, fold, out_dir, run=run,
                           options=ScoreOptions(protocol=metric_protocol))
    return {k: float(v) for k, v in ev.metrics.items()}


def aggregate_step(
    fold_metrics: Sequence[Mapping[str, float]],
    out_dir: str,
    *,
    report_dirs: Sequence[str] = (),
    ctx: RunContext = UNTRACKED,
    metric_protocol: str = DEFAULT_PROTOCOL,
) -> dict[str, float]:
    """The CV table (model and no-skill rows) -> ``out_dir/cv_table.md`` + ``cv_summary.json``; logged on the
    parent (:func:`m2snet.workflows.cv_summary.report_tasks`, as ``m2snet cv`` does).

    ``report_dirs``: the evaluate steps' reports (in ``fold_metrics``' order), whose per-case scores become
    ``cv_per_case.csv``; with several seeds the table is mean +- std over seeds x folds, a row per seed and fold.
    """
    summary = report_tasks(fold_metrics, report_dirs, out_dir, name="CV", protocol=metric_protocol,
                           parent=ctx.parent())
    return summary.flat_metrics()


def register_step(
    model_dirs: Sequence[str],
    cv_metrics: Mapping[str, float],
    split_path: str,
    *,
    model_name: str,
    dataset_version: str,
    ctx: RunContext = UNTRACKED,
    metric_protocol: str = DEFAULT_PROTOCOL,
    data: str | None = None,
) -> str:
    """Register the folds' ensemble as ONE model version (once per pipeline run); return the version.

    With ``data`` (the dataset the folds were trained on), the version carries an input guard fitted on it
    (m2snet.evaluation.guard: each fold model's training cases, thresholded on its held-out cases), and its
    description states the guard's measured false-flag rate."""

    checkpoints = [fold_checkpoint(d) for d in model_dirs]
    # The key: the pipeline run (a retried step) or, run by hand, the checkpoints themselves.
    pipeline_run_id = ctx.pipeline_run_id
    key = pipeline_run_id or "ckpt-" + "-".join(sha256_file(c)[:12] for c in checkpoints)
    existing = find_version_by_key(model_name, key)
    if existing is not None:
        log.info("model %s version %s already registered for %s", model_name, existing.version, key)
        return str(existing.version)
    split_sha = sha256_file(split_path)
    cv_dice, noskill_dice = cv_metrics.get("cv_dice_mean"), cv_metrics.get("cv_dice_noskill")
    tags = {
        "data_version": dataset_version, "split_sha256": split_sha, "pipeline_run_id": pipeline_run_id or "manual",
        "n_folds": len(checkpoints), "metric_protocol": metric_protocol,
        # cv_<metric>_mean/_std, cv_<metric>_noskill, cv_lesion_...: percent (MAE a fraction)
        **{k: f"{float(v):.4f}" for k, v in cv_metrics.items()},
        # The promotion gate's scores: fractions (0..1), like the --floor they are compared with.
        SCORE_TAG: f"{cv_dice / 100.0:.6f}" if cv_dice is not None else "nan",
        NOSKILL_TAG: f"{noskill_dice / 100.0:.6f}" if noskill_dice is not None else "nan",
    }
    parent = ctx.parent()
    with tempfile.TemporaryDirectory(prefix="m2snet-guard-") as tmp:
        guard = fit_input_guard(checkpoints, data, split_path, Path(tmp)) if data else None
        info = log_segmentation_model(checkpoints, name="model", run_id=parent.run_id if parent else None,
                                      tracking_uri=TrackingConfig().resolved_uri(),
                                      guard=guard.path if guard else None)
    description = describe_version(n_folds=len(checkpoints), dataset_version=dataset_version, split_sha256=split_sha,
                                   cv_metrics=cv_metrics, pipeline_run_id=pipeline_run_id,
                                   metric_protocol=metric_protocol, guard_rates=guard.rates if guard else None)
    mv = register_model_version(info.model_uri, model_name, idempotency_key=key, tags=tags, description=description)
    if parent is not None:
        parent.set_tags({"m2snet.registered_model": f"{model_name}/{mv.version}"})
    return str(mv.version)


def promote_step(model_name: str, version: str, *, floor: float, margin: float,
                 noskill_margin: float = PromotionPolicy.noskill_margin, require_ci: bool = False,
                 force: bool = False, ctx: RunContext = UNTRACKED) -> bool:
    """Apply the promotion gate (``require_ci``: the paired CI against production where the two are
    comparable, else the margin rule, the reason saying which); record the decision on the parent run and
    close it."""

    policy = PromotionPolicy(floor=floor, margin=margin, noskill_margin=noskill_margin, require_ci=require_ci)
    decision = promote(model_name, version, policy, force=force)
    with ctx.parent(create=False) or contextlib.nullcontext() as parent:
        if parent is not None:
            parent.set_tags({"m2snet.promotion": ("promoted: " if decision.promoted else "not promoted: ")
                             + decision.reason})
    return decision.promoted


def run_description(parent: Tracker) -> str:
    """A finished pipeline run's description in MLflow (markdown): the CV table, the model and its fate."""
    run = parent.client.get_run(parent.run_id)
    tags, params = run.data.tags, run.data.params
    with tempfile.TemporaryDirectory() as tmp:
        try:
            table = Path(parent.client.download_artifacts(parent.run_id, "cv/cv_table.md", tmp)).read_text().strip()
        except Exception as err:  # noqa: BLE001 - the description is best effort; say what is missing
            table = f"(no CV table: {type(err).__name__})"
    lines = [CV_DESCRIPTION_HEADING, "", table, ""]
    if tags.get("m2snet.registered_model"):
        decision = tags.get("m2snet.promotion", "not promoted")
        lines.append(f"- **Model:** `{tags['m2snet.registered_model']}` -- {decision}")
    if params.get("data_version"):
        lines.append(f"- **Data:** `{params['data_version']}` from {params.get('data_source', '?')}; "
                     f"split sha256 `{params.get('split_sha256', '?')[:16]}`")
    return "\n".join(lines)


# KFP's final states of a run stopped on purpose: its MLflow runs end KILLED, not FAILED.
CANCELLED_STATES = ("CANCELED", "CANCELLED", "CANCELING")


def _close_open_children(parent: Tracker, status: str = "FAILED") -> list[str]:
    """Mark the parent's still-RUNNING descendants ``status`` (a fold whose task died or was stopped); return
    the names of all that ended so (FAILED or KILLED)."""

    closed, todo = [], [parent.run_id]
    while todo:
        for child in iter_child_runs(parent.client, todo.pop()):
            todo.append(child.info.run_id)
            if child.info.status == "RUNNING":
                parent.client.set_terminated(child.info.run_id, status=status)
                closed.append(child.info.run_name)
            elif child.info.status in ("FAILED", "KILLED"):
                closed.append(child.info.run_name)
    return sorted(closed)


def finalize_step(state: str, error_message: str = "", *, ctx: RunContext = UNTRACKED) -> str:
    """The pipeline's exit handler: close the parent MLflow run whatever happened.

    Returns the registered model version (``""`` when the run failed or registered none): the
    pipeline's output, which KFP only takes from the top level, outside the exit handler's group.

    Success: the parent's description becomes the CV table and the promotion decision. Failure
    (any state but SUCCEEDED): still-running child runs and the parent are marked FAILED, with the
    error and the failed runs in tags and the description (the parent is created if the first step
    failed before making it, so every pipeline run is visible in MLflow). A cancelled run
    (:data:`CANCELLED_STATES`, e.g. the local runner stopped by Ctrl-C) ends the same way, KILLED.
    """
    parent = ctx.parent(create=state != "SUCCEEDED")
    if parent is None:
        return ""
    if state == "SUCCEEDED":
        parent.set_description(run_description(parent))
        parent.end("FINISHED")
        registered = parent.client.get_run(parent.run_id).data.tags.get("m2snet.registered_model", "")
        return registered.rpartition("/")[2]
    status = "KILLED" if state.upper() in CANCELLED_STATES else "FAILED"
    closed = _close_open_children(parent, status)
    parent.set_tags({"m2snet.status": state.lower(), "m2snet.error": error_message[:4000] or "(none given)",
                     **({"m2snet.failed_runs": ", ".join(closed)} if closed else {})})
    parent.set_description(f"**Pipeline {state}.** {error_message}"
                           + (f"\n\n{status.capitalize()} MLflow runs: {', '.join(closed)}" if closed else ""))
    parent.end(status)
    return ""
