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

Tracking is attached here, not in the trainer: :func:`m2snet.mlops.training_run.tracking_callbacks`
gives ``train`` the MLflow callback of a fold's run. That callback records the run id in ``<fold dir>/mlflow_run.json``
(``m2snet.mlops.tracking.write_run_file``), so a later step (the pipeline's evaluate task, a resumed
CV) reopens the same run (:func:`fold_run`).
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from m2snet.data.format import load_dataset
from m2snet.data.split import Split, load_split
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
from m2snet.evaluation.plots import cv_learning_curves
from m2snet.files import write_json, write_text
from m2snet.hashing import sha256_file
from m2snet.mlops.cv_results import per_case_rows, write_cv_per_case
from m2snet.mlops.lineage import DatasetLineage
from m2snet.mlops.tracking import PARENT_RUN_FILE, RUN_FILE, Tracker, read_run_file, reopen_run, write_run_file
from m2snet.mlops.training_run import config_params, tracking_callbacks
from m2snet.runtime import git_commit
from m2snet.training.config import TrainConfig
from m2snet.workflows.context import UNTRACKED, RunContext
from m2snet.workflows.presets import rate_params, settle_config
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


def aggregate_cv(per_fold: Sequence[Mapping[str, float]] | Sequence[FoldResult],
                 folds: Sequence[int] | None = None, protocol: str = DEFAULT_PROTOCOL) -> CVSummary:
    """Mean +- std over folds of each metric (fractions in, percent out; MAE and distances as they are).

    Accepts FoldResult objects or plain metric dicts (e.g. read back from each fold's
    ``eval/metrics.json`` by a pipeline step). Counts (``n_cases``, ``n_nan_<m>``, ...) are summed.
    """

    rows = [r.metrics if isinstance(r, FoldResult) else dict(r) for r in per_fold]
    if not rows:
        raise M2SNetError("aggregate_cv: no fold results to aggregate")
    if folds is None:
        folds = [r.fold if isinstance(r, FoldResult) else i for i, r in enumerate(per_fold)]
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
    summary = aggregate_cv(per_fold, folds, protocol=protocol)
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


def fold_run(fold_dir: str | os.PathLike, tracking=None):
    """The fold's MLflow run, reopened from ``<fold_dir>/mlflow_run.json`` (None without one)."""

    return reopen_run(Path(fold_dir) / RUN_FILE, tracking)


def fold_tags(fold: int, seed: int | None = None) -> dict[str, str]:
    """A fold run's tags; ``seed``: one of a repeated CV's seeds (``m2snet cv --seeds``)."""
    return {"m2snet.fold": str(fold), "m2snet.kind": "fold", **({"m2snet.seed": str(seed)} if seed is not None else {})}


def open_fold_run(ctx: RunContext, parent, fold: int, *, seed: int | None = None,
                  fold_dir: str | os.PathLike | None = None):
    """The fold's MLflow run: reopened from ``fold_dir`` (a resume), else a child of ``parent``, else a
    stand-alone run; None untracked. Use it with ``with``: it ends FINISHED, or FAILED on an error."""
    if not ctx.tracked:
        return None
    if fold_dir is not None:
        run = fold_run(fold_dir, ctx.tracking)
        if run is not None:
            return run
    name = f"fold-{fold}" if seed is None else f"seed-{seed}-fold-{fold}"
    if parent is not None:
        return parent.child(name, tags=fold_tags(fold, seed))
    return Tracker.start(ctx.tracking, run_name=name, tags=fold_tags(fold, seed))


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
    from m2snet.mlops.pyfunc_logging import log_segmentation_model

    info = log_segmentation_model([checkpoint], name="model", run_id=run.run_id,
                                  tracking_uri=run.cfg.resolved_uri(), tta_flip=tta_flip)
    run.set_tags({"m2snet.model_uri": info.model_uri})
    return info.model_uri


def tune_fold(cfg: TrainConfig, fold: int, tuning, out_dir: str | os.PathLike, *, parent=None,
              tracking: bool = True, seed_tag: int | None = None):
    """Nested tuning of fold ``fold``: the study's objective is an inner split of the fold's training cases.

    Returns the :class:`m2snet.workflows.tuning.TuningResult`; its ``best_params`` are TrainConfig fields.
    """

    return tune(cfg.override(fold=fold), tuning, out_dir, parent=parent, tracking=tracking, seed_tag=seed_tag)


def fit_fold(cfg: TrainConfig, fold: int, fold_dir: str | os.PathLike, *, tracker=None, resume: bool = False,
             tuned: Mapping[str, float] | None = None, explicit: frozenset[str] = frozenset(), parent=None):
    """Train fold ``fold`` into ``fold_dir`` with the precedence of
    :func:`m2snet.workflows.presets.settle_config` (preset < ``tuned`` < the ``explicit`` fields); log the
    rates and their source, the selection rule, the dataset lineage and the training artifacts."""
    from m2snet.training.trainer import train

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
               out_dir: str | os.PathLike, *, tracker=None, step: int = 0, tta_flip: bool = False,
               device: str = "auto", batch_size: int = 8, with_sod: bool = True, progress: bool = False,
               protocol: str = DEFAULT_PROTOCOL):
    """Evaluate ``checkpoint`` (and the no-skill predictor) on the fold's validation cases at their original
    sizes under the metric ``protocol``; log to ``tracker``."""
    from m2snet.evaluation.evaluate import EvalOptions, evaluate

    ev = evaluate([checkpoint], data, case_ids=list(val_cases), out_dir=out_dir, options=EvalOptions(
        tta_flip=tta_flip, device=device, batch_size=batch_size, with_sod=with_sod, progress=progress,
        protocol=protocol))
    if tracker is not None:
        tracker.log_params({"metric_protocol": protocol})
        log_evaluation(tracker, ev, step=step)
    return ev


def train_fold(
    cfg: TrainConfig,
    fold: int,
    out_dir: str | os.PathLike,
    *,
    ctx: RunContext = UNTRACKED,
    explicit: frozenset[str] = frozenset(),
    resume: bool = False,
    log_model: bool = True,
    tta_flip: bool = False,
    with_sod: bool = True,
    fold_dir: str | os.PathLike | None = None,
    tuning=None,
    protocol: str = DEFAULT_PROTOCOL,
    seed_tag: int | None = None,
) -> FoldResult:
    """Tune (with ``tuning``, a TuningConfig), train and score fold ``fold`` of ``cfg.split`` in ``out_dir/fold<k>``.

    ``ctx``: where it is tracked (with ``ctx.parent_run_id``, the fold is a child run of that CV);
    ``explicit``: the config fields the user set (they win over tuned values).
    ``fold_dir`` overrides the output directory (``m2snet train`` writes exactly to ``--out``).
    ``seed_tag``: name and tag the fold's run with its seed (one seed of a repeated CV).
    """
    if not cfg.split:
        raise M2SNetError("cross-validation needs a split file (--split)")
    fold_dir = Path(fold_dir) if fold_dir is not None else Path(out_dir) / f"fold{fold}"
    resume = resume and (fold_dir / "last.pt").is_file()
    parent = ctx.parent(create=False)
    tuned: dict[str, float] = {}
    if tuning is not None and not resume:
        tuned = tune_fold(cfg, fold, tuning, fold_dir.with_name(fold_dir.name + "-tune"), parent=parent,
                          tracking=ctx.tracked, seed_tag=seed_tag).best_params
    run = open_fold_run(ctx, parent, fold, seed=seed_tag, fold_dir=fold_dir if resume else None)
    with run or contextlib.nullcontext():
        result = fit_fold(cfg, fold, fold_dir, tracker=run, resume=resume, tuned=tuned, explicit=explicit,
                          parent=parent)
        ev = score_fold(result.checkpoint, cfg.data, result.val_cases, fold_dir / "eval", tracker=run,
                        step=cfg.epochs, tta_flip=tta_flip, device=result.device,
                        batch_size=max(1, cfg.batch_size), with_sod=with_sod, progress=cfg.progress,
                        protocol=protocol)
        fr = FoldResult(fold=fold, metrics=ev.metrics, out_dir=fold_dir, checkpoint=result.checkpoint,
                        selected_epoch=result.selected_epoch, per_case_csv=ev.per_case_csv,
                        overlay_png=ev.overlay_png, learning_curves_png=fold_dir / "learning_curves.png",
                        history=result.history, tuned=tuned)
        if run is not None:
            fr.run_id = run.run_id
            if log_model:
                fr.model_uri = log_fold_model(run, result.checkpoint, tta_flip=tta_flip)
            else:
                run.log_artifact(result.checkpoint, "checkpoints")
        write_json(fold_dir / "fold_result.json", {"fold": fold, "metrics": fr.metrics, "run_id": fr.run_id,
                                                   "model_uri": fr.model_uri, "checkpoint": str(fr.checkpoint),
                                                   "selection": cfg.selection,
                                                   "selected_epoch": fr.selected_epoch, "tuned": tuned})
    return fr


def write_cv_summary(summary: CVSummary, per_fold: Sequence[Mapping[str, Any]], out_dir: str | os.PathLike,
                     title: str) -> tuple[Path, Path]:
    """``cv_summary.json`` (per_fold: a list of {"fold", metrics...}) and ``cv_table.md`` in ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "cv_summary.json", {**summary.to_dict(), "per_fold": [dict(r) for r in per_fold]})
    write_text(out / "cv_table.md", summary.table(title=title) + "\n")
    return out / "cv_summary.json", out / "cv_table.md"


@dataclass
class CVResult:
    summary: CVSummary
    folds: list[FoldResult]
    out_dir: Path
    parent_run_id: str | None = None


def split_params(split: Split, seeds: Sequence[int] | None = None,
                 folds: Sequence[int] | None = None) -> dict[str, Any]:
    """What a CV's parent run records of its split and code, alike from ``m2snet cv`` and the pipeline's split
    step: the split file's hash, its folds and duplicate rule, the folds run, the repeated seeds, the commit."""
    return {"split_sha256": split.sha256, "n_folds": split.n_folds, "split_group": split.group,
            "folds": ",".join(map(str, range(split.n_folds) if folds is None else folds)),
            **({"seeds": ",".join(map(str, seeds))} if seeds else {}), "git_commit": git_commit()}


def run_cv(
    cfg: TrainConfig,
    out_dir: str | os.PathLike,
    folds: Sequence[int] | None = None,
    *,
    ctx: RunContext = UNTRACKED,
    explicit: frozenset[str] = frozenset(),
    run_name: str | None = None,
    resume: bool = False,
    log_models: bool = True,
    tta_flip: bool = False,
    with_sod: bool = True,
    tuning=None,
    protocol: str = DEFAULT_PROTOCOL,
    seeds: Sequence[int] | None = None,
) -> CVResult:
    """Train + evaluate the listed folds (default: all) under one parent run; print the table.

    ``ctx``: where it is tracked (``ctx.parent_run_id``: attach the folds to that CV run);
    ``explicit``: the config fields the user set, which win over tuned values
    (:func:`m2snet.workflows.presets.settle_config`).
    ``tuning`` (a TuningConfig): nested tuning, one study per fold on that fold's inner split.
    ``protocol``: the metric protocol (``project`` or the paper's ``reference``).
    ``seeds``: repeat the CV once per seed (initialisation and data order; the cases each run uses
    stay those of ``cfg``'s seed, through ``TrainConfig.case_seed``), in ``out_dir/seed<s>/fold<k>``;
    the table is then mean +- std over seeds x folds. Every fold run records its seed (param ``seed``).
    The per-case scores of every seed and fold go to ``cv_per_case.csv`` (artifact ``cv/``).
    """
    check_protocol(protocol)

    if not cfg.split:
        raise M2SNetError("cross-validation needs a split file (--split)")
    info = load_dataset(cfg.data)
    split = load_split(cfg.split, info, accept_version=cfg.accept_split_version)
    if split.is_fixed:
        raise M2SNetError(f"{split.path}: a fixed split (named test sets), not k folds; "
                          "run it with `m2snet train --split` or `m2snet benchmark`")
    folds = list(range(split.n_folds)) if folds is None else list(folds)
    for k in folds:
        split.fold(k)  # range check with a clear error
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    given, repeated = bool(seeds), bool(seeds) and len(seeds) > 1
    seeds = list(seeds) if seeds else [cfg.seed]
    # Repeated seeds vary initialisation and data order, not which cases are used.
    case_seed = cfg.seed if cfg.case_seed is None else cfg.case_seed
    data_version = info.version
    if ctx.tracked and ctx.parent_run_id is None and resume:
        ctx = ctx.with_parent(read_run_file(out / PARENT_RUN_FILE))
    parent = ctx.parent(run_name=run_name or f"cv-{cfg.model}", tags={"m2snet.kind": "cv"})
    with parent or contextlib.nullcontext():
        if parent is not None:
            ctx = ctx.with_parent(parent.run_id)
            write_run_file(out / PARENT_RUN_FILE, parent)
            # The children record what actually happened (pretrained source, device, the rates and their
            # source); the parent records the shared inputs.
            parent.log_params({**{k: v for k, v in config_params(cfg.to_dict()).items() if k.startswith("config.")},
                               "data_version": data_version, "seed": cfg.seed, "selection": cfg.selection,
                               **split_params(split, seeds if given else None, folds),
                               "tuning": "nested per fold" if tuning is not None else "none"})
            parent.log_dataset(dataset_lineage(cfg.data))
        runs: list[tuple[int, FoldResult]] = []  # (seed, fold result)
        title = cfg.model + (f" ({len(seeds)} seeds)" if repeated else "")
        for seed in seeds:
            seed_cfg = cfg.override(seed=seed, case_seed=case_seed) if given else cfg
            seed_out = out / f"seed{seed}" if repeated else out
            for k in folds:
                log.info("=== %sfold %d (%d of %d) ===", f"seed {seed}, " if repeated else "", k, len(runs) + 1,
                         len(folds) * len(seeds))
                fr = train_fold(seed_cfg, k, seed_out, ctx=ctx, explicit=explicit, resume=resume,
                                log_model=log_models, tta_flip=tta_flip, with_sod=with_sod, tuning=tuning,
                                protocol=protocol, seed_tag=seed if repeated else None)
                runs.append((seed, fr))
        results = [fr for _, fr in runs]
        per_case = write_cv_per_case([row for s, r in runs for row in per_case_rows(r.per_case_csv, r.fold, s)], out,
                                     {"data_version": data_version, "split_sha256": split.sha256, "seeds": seeds,
                                      "folds": folds, "model": cfg.model})
        summary = report_cv([r.metrics for r in results], [r.fold for r in results], out, title=title,
                            protocol=protocol, parent=parent, artifacts=per_case,
                            row_labels=[{**({"seed": s} if repeated else {}), "fold": r.fold} for s, r in runs])
        curves = cv_learning_curves({(f"{r.fold} (seed {s})" if repeated else r.fold): r.history for s, r in runs},
                                    out / "cv_learning_curves.png", title=f"{title}: {len(folds)} folds")
        if parent is not None:
            parent.log_artifact(curves, "cv")
    return CVResult(summary=summary, folds=results, out_dir=out, parent_run_id=parent.run_id if parent else None)


def noskill_cv(data: str | os.PathLike, split: str | os.PathLike | None, folds: Sequence[int] | None,
               out_dir: str | os.PathLike, *, protocol: str = DEFAULT_PROTOCOL,
               with_sod: bool = True, accept_split_version: str | None = None) -> CVSummary:
    """The no-skill rows of a CV table without training: the all-background predictor scored on every
    fold's validation cases (or on all cases without a split), through the same evaluation as a model.

    Writes ``<out_dir>/fold<k>/`` (per-case CSV) and the report (``cv_table.md``, ``cv_summary.json``).
    """
    from m2snet.evaluation.evaluate import NoSkillPredictor, evaluate_predictor

    info = load_dataset(data)
    out = Path(out_dir)
    if split:
        s = load_split(split, info, accept_version=accept_split_version)
        folds = list(range(s.n_folds)) if folds is None else list(folds)
        cases = {k: list(s.fold(k).val) for k in folds}
    else:
        folds, cases = [0], {0: None}
    per_fold = []
    for k in folds:
        ev = evaluate_predictor(NoSkillPredictor(info.n_classes), data, cases[k], out / f"fold{k}", n_overlay=2,
                                with_sod=with_sod, protocol=protocol, title="no skill")
        # The predictor IS the no-skill one: its rows alone, not twice.
        per_fold.append({key: v for key, v in ev.metrics.items() if not key.startswith(NOSKILL_PREFIX)})
    return report_cv(per_fold, folds, out, title="no skill", protocol=protocol)
