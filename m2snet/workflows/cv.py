"""``m2snet cv``: a cross-validation's task list run in one process, under one parent run.

The list is the pipeline's (:func:`m2snet.workflows.fold_tasks.fold_tasks`) and every task goes through
the pipeline's step functions (:func:`m2snet.workflows.folds.run_fold`: tune -> train -> evaluate), so
``m2snet cv`` and ``m2snet pipeline run`` of the same settings record the same MLflow run tree:

    parent run "cv-<model>"         params: config, data version, split hash, seeds; metrics: cv_*; cv/
      +- "[seed-S-]tune-fold-K"     each task's Optuna study (with --tune-trials)
      +- "[seed-S-]fold-K"          one per task: training, evaluation at original size, its model

Parallel workers share one ``--out`` (``--folds 0,1`` in one process, ``--folds 2,3`` in another): a task
runs under a lock on its directory (a second process on the same task fails at once, naming the first),
and each worker writes the CV-level report, under a lock, over every completed task of the SAME CV in
``--out`` (:func:`cv_key`), so the last to finish leaves the report of all.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

from m2snet.data.format import load_dataset
from m2snet.data.split import Split, load_split
from m2snet.errors import M2SNetError
from m2snet.evaluation.evaluate import NoSkillPredictor, evaluate_predictor
from m2snet.evaluation.metrics import DEFAULT_PROTOCOL, NOSKILL_PREFIX, check_protocol
from m2snet.evaluation.plots import cv_learning_curves
from m2snet.files import read_json
from m2snet.locks import writer_lock
from m2snet.mlops.tracking import PARENT_RUN_FILE, read_run_file, write_run_file
from m2snet.mlops.training_run import config_params
from m2snet.runtime import git_commit
from m2snet.training.config import TrainConfig
from m2snet.workflows.context import UNTRACKED, RunContext
from m2snet.workflows.cv_summary import FOLD_INFO, CVSummary, report_cv, report_tasks
from m2snet.workflows.fold_tasks import NO_SEED, FoldTask, fold_tasks
from m2snet.workflows.folds import FoldOptions, FoldResult, dataset_lineage, run_fold
from m2snet.workflows.presets import TUNED_RATES

log = logging.getLogger("m2snet.workflows.cv")


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


def cv_split(cfg: TrainConfig, folds: Sequence[int] | None) -> tuple[Split, list[int]]:
    """``cfg.split``, checked to be k folds, and the folds to run (default: all), range-checked."""
    if not cfg.split:
        raise M2SNetError("cross-validation needs a split file (--split)")
    split = load_split(cfg.split, load_dataset(cfg.data), accept_version=cfg.accept_split_version)
    if split.is_fixed:
        raise M2SNetError(f"{split.path}: a fixed split (named test sets), not k folds; "
                          "run it with `m2snet train --split` or `m2snet benchmark`")
    folds = list(range(split.n_folds)) if folds is None else list(folds)
    for k in folds:
        split.fold(k)  # range check with a clear error
    return split, folds


def log_cv_inputs(parent, cfg: TrainConfig, split: Split, tasks: Sequence[FoldTask], tuned: bool) -> None:
    """The parent records the shared inputs; the children what actually happened (pretrained source,
    device, the rates and their source)."""
    seeds = list(dict.fromkeys(t.seed for t in tasks)) if tasks[0].seed != NO_SEED else None
    folds = list(dict.fromkeys(t.fold for t in tasks))
    parent.log_params({**{k: v for k, v in config_params(cfg.to_dict()).items() if k.startswith("config.")},
                       "data_version": load_dataset(cfg.data).version, "seed": cfg.seed, "selection": cfg.selection,
                       **split_params(split, seeds, folds), "tuning": "nested per fold" if tuned else "none"})
    parent.log_dataset(dataset_lineage(cfg.data))


def run_cv(cfg: TrainConfig, out_dir: str | os.PathLike, folds: Sequence[int] | None = None, *,
           ctx: RunContext = UNTRACKED, options: FoldOptions | None = None, seeds: Sequence[int] = (),
           run_name: str | None = None) -> CVResult:
    """Run the CV's tasks (``folds``, default all; once per seed of ``seeds``) under one parent run; print
    the table.

    ``ctx``: where it is tracked (``ctx.parent_run_id``: attach the tasks to that CV run); ``options``: what
    every task does (:class:`m2snet.workflows.folds.FoldOptions`: nested tuning, resume, the metric
    protocol, ...). ``seeds``: repeat the CV once per seed (:meth:`FoldTask.config`: initialisation and data
    order change, the cases do not), in ``out_dir/seed<s>/fold<k>`` when more than one; the table is then
    mean +- std over seeds x folds. The per-case scores of every task go to ``cv_per_case.csv`` (``cv/``).
    """
    options = options or FoldOptions()
    check_protocol(options.score.protocol)
    split, folds = cv_split(cfg, folds)
    tasks = fold_tasks(folds, seeds)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if ctx.tracked and ctx.parent_run_id is None and options.resume:
        ctx = ctx.with_parent(read_run_file(out / PARENT_RUN_FILE))
    parent = ctx.parent(run_name=run_name or f"cv-{cfg.model}", tags={"m2snet.kind": "cv"})
    with parent or contextlib.nullcontext():
        if parent is not None:
            ctx = ctx.with_parent(parent.run_id)
            write_run_file(out / PARENT_RUN_FILE, parent)
            log_cv_inputs(parent, cfg, split, tasks, options.tuning is not None)
        key = cv_key(cfg, split, seeds, options)
        results = []
        for i, task in enumerate(tasks, 1):
            log.info("=== %sfold %d (%d of %d) ===", f"seed {task.seed}, " if task.seed_tag is not None else "",
                     task.fold, i, len(tasks))
            fold_dir = out / task.dir_name
            fold_dir.parent.mkdir(parents=True, exist_ok=True)  # seed<S>/: the lock file goes beside fold<K>
            # Not waiting: a second process on the same task would train into the same files as the first.
            with writer_lock(fold_dir):
                results.append(run_fold(cfg, task, fold_dir, ctx=ctx, split=split, options=options, cv_key=key))
        summary = report_cv_tasks(results, out, key, title=cfg.model, n_seeds=tasks[0].n_seeds,
                                  protocol=options.score.protocol, parent=parent)
    return CVResult(summary=summary, folds=results, out_dir=out, parent_run_id=parent.run_id if parent else None)


def noskill_cv(data: str | os.PathLike, split: str | os.PathLike | None, folds: Sequence[int] | None,
               out_dir: str | os.PathLike, *, protocol: str = DEFAULT_PROTOCOL,
               with_sod: bool = True, accept_split_version: str | None = None) -> CVSummary:
    """The no-skill rows of a CV table without training: the all-background predictor scored on every
    fold's validation cases (or on all cases without a split), through the same evaluation as a model.

    Writes ``<out_dir>/fold<k>/`` (per-case CSV) and the report (``cv_table.md``, ``cv_summary.json``).
    """
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


# --- one CV, several processes: which tasks in --out are this CV's, and its report over all of them ------------

# The training config's fields that do not say WHICH CV a task belongs to: the workers of one CV may differ in
# them (cv_key leaves them out).
NOT_THE_CV = (
    "out_dir",  # run_cv puts every task in <out>/<task dir>, whatever it says
    "fold",  # each task sets its own
    "data", "split",  # paths, which two workers may spell differently: the key holds what they name instead
    "progress",  # a progress bar
    "num_workers",  # loader processes: batches and augmentation come from one generator seeded by (seed, epoch)
    "device",  # where a worker trains (a GPU box and a CPU box may share a CV), not what
    "cache", "cache_dir",  # the preprocessed cache holds the arrays the images decode to: the same inputs
)
# Of the tuning config: where the study is kept and whether trial checkpoints stay; not what is searched.
NOT_THE_TUNING = ("storage", "keep_trial_dirs")
SCORING = ("protocol", "tta_flip", "with_sod")  # the score options that change a fold's metrics


def cv_key(cfg: TrainConfig, split: Split, seeds: Sequence[int], options: FoldOptions) -> str:
    """Which CV a task belongs to, as a hash that ``run_fold`` records in ``fold_result.json``: the base
    training config (less :data:`NOT_THE_CV`), the data version, the split file's hash, the seeds, the tuning
    (and which tuned rates the user fixed over it) and how the folds are scored. Two processes of one CV
    (``--folds`` apart) get the same key; a report merges only tasks of its own key."""
    tuning = None
    if options.tuning is not None:
        tuning = {k: v for k, v in asdict(options.tuning).items() if k not in NOT_THE_TUNING}
        tuning["user_rates"] = sorted(set(options.explicit) & set(TUNED_RATES))  # they win over tuned ones
    identity = {"config": {k: v for k, v in cfg.to_dict().items() if k not in NOT_THE_CV},
                "data_version": load_dataset(cfg.data).version, "split_sha256": split.sha256,
                "seeds": sorted(seeds), "tuning": tuning,
                "scoring": {k: getattr(options.score, k) for k in SCORING}}
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()


@dataclass
class ReportTask:
    """A completed task in a CV's report: its metrics, where its evaluation report and history are, and
    whether this process ran it."""

    fold: int
    seed: int | None
    metrics: dict[str, float]
    fold_dir: Path
    history: list[dict] = field(default_factory=list, repr=False)
    run_id: str | None = None
    here: bool = True

    @classmethod
    def of(cls, result: FoldResult) -> "ReportTask":
        return cls(result.fold, result.seed, result.metrics, result.out_dir, result.history, result.run_id)

    def label(self, repeated: bool) -> int | str:
        """How the learning curves and the log name it: its fold, with its seed when seeds repeat."""
        return f"{self.fold} (seed {self.seed})" if repeated else self.fold


def task_dirs(out: Path) -> list[Path]:
    """The task directories in a CV's output directory (:attr:`FoldTask.dir_name`), by path."""
    found = [*out.glob("fold*"), *out.glob("seed*/fold*")]
    return sorted(d for d in found if re.fullmatch(r"fold\d+", d.name) and d.is_dir())


def other_tasks(out: Path, key: str, ran: Sequence[Path] = ()) -> list[ReportTask]:
    """The completed tasks of the CV ``key`` in ``out`` (a ``fold_result.json`` of that key) but those in
    ``ran``; one log line names the task directories left out: another CV's, an older run's (no key)."""
    found, skipped = [], []
    for fold_dir in task_dirs(out):
        if fold_dir in ran or not (fold_dir / "fold_result.json").is_file():
            continue  # ran here, or not finished (running elsewhere: its process reports it when done)
        name = fold_dir.relative_to(out).as_posix()
        result = read_json(fold_dir / "fold_result.json", "task result")
        if result.get("cv_key") != key:
            skipped.append(f"{name} ({'another CV' if result.get('cv_key') else 'no cv_key: an older run'})")
            continue
        history = fold_dir / "history.json"
        read_json(fold_dir / "eval" / FOLD_INFO, "task's evaluation report")  # the report reads it: fail here
        found.append(ReportTask(int(result["fold"]), result.get("seed"), result["metrics"], fold_dir,
                                read_json(history, "training history") if history.is_file() else [],
                                result.get("run_id"), here=False))
    if skipped:
        log.info("%s: the report leaves out %s", out, ", ".join(skipped))
    return found


def report_cv_tasks(results: Sequence[FoldResult], out: Path, key: str, *, title: str, n_seeds: int = 1,
                    protocol: str = DEFAULT_PROTOCOL, parent=None) -> CVSummary:
    """The CV's report in ``out`` (:func:`report_tasks`, the learning curves) over this process's ``results``
    and every other completed task of the same CV there (:func:`other_tasks`: parallel workers), by seed and
    fold. Under a lock on the report, waiting: the workers write it one after the other, so the last to
    finish writes the report of all."""
    repeated = n_seeds > 1
    with writer_lock(out / "cv_summary.json", wait=True):
        tasks = [ReportTask.of(r) for r in results] + other_tasks(out, key, [r.out_dir for r in results])
        tasks.sort(key=lambda t: (t.seed if t.seed is not None else -1, t.fold))
        summary = report_tasks([t.metrics for t in tasks], [t.fold_dir / "eval" for t in tasks], out,
                               name=title, protocol=protocol, parent=parent)
        curves = cv_learning_curves({t.label(repeated): t.history for t in tasks}, out / "cv_learning_curves.png",
                                    title=f"{title}{f' ({n_seeds} seeds)' if repeated else ''}: "
                                          f"{len({t.fold for t in tasks})} folds")
    if parent is not None:
        parent.log_artifact(curves, "cv")
    others = [str(t.label(repeated)) for t in tasks if not t.here]
    if others:  # else the parent's children are the report's tasks: nothing to add
        sep = ", " if repeated else ","  # "0 (seed 42), 1 (seed 42)"; "0,1"
        log.info("the report covers folds %s; %s %s ran in another process",
                 sep.join(str(t.label(repeated)) for t in tasks), "folds" if len(others) > 1 else "fold",
                 sep.join(others))
        if parent is not None:  # compact: 8000 characters (MLflow's limit) hold some 120 tasks
            parent.set_tags({"m2snet.cv_report_tasks": json.dumps(
                [{"fold": t.fold, "seed": t.seed, "run_id": t.run_id, "here": t.here} for t in tasks],
                separators=(",", ":"))})
    return summary
