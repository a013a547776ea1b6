"""The paper's experiments as named protocols: split recipe + training recipe + test sets + its numbers.

- :data:`PROTOCOLS` -- ``busi`` (four-fold CV, Tab. 4), ``polyp`` (the PraNet split, Tab. 1),
  ``polyp-video`` (clips 60 / 20 / 20, Tab. 2), ``covid`` (the Inf-Net split, Tab. 3) and ``oct``
  (GOALS layers, Tab. 5).
- :func:`run_fixed` -- train on a fixed split's training set (its validation set scored every epoch)
  and evaluate every named test set: ``test_sets.md`` (the paper's layout, one row per set + mean)
  and one MLflow run whose metrics are ``<set>_<metric>``.
- ours beside the paper's figures: :mod:`m2snet.workflows.paper`; one protocol end to end (``m2snet
  benchmark``): :mod:`m2snet.workflows.benchmark`.
- the fixed-split pipeline's steps (:func:`split_step`, :func:`train_step`, :func:`evaluate_step`,
  :func:`register_protocol_step`, :func:`finalize_protocol_step`), one per component of
  ``m2snet.kubeflow.pipelines.protocol``; its prepare and promote are the CV pipeline's.

Every test-set table carries, under each row, the no-skill predictor's (all background) on the same
cases, and every paper comparison a no-skill column: a model that learnt nothing is visible.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from m2snet.data.fixed_split import make_fixed_split
from m2snet.data.format import load_dataset
from m2snet.data.split import Split, load_split, make_split
from m2snet.errors import M2SNetError
from m2snet.evaluation.metrics import DEFAULT_PROTOCOL, NOSKILL_PREFIX
from m2snet.evaluation.testsets import TestSetReport, evaluate_split_test_sets
from m2snet.files import write_json, write_text
from m2snet.hashing import sha256_file
from m2snet.mlops.mlflow_store import TrackingConfig
from m2snet.mlops.promotion_gate import NOSKILL_TAG, SCORE_TAG
from m2snet.mlops.pyfunc_logging import log_segmentation_model
from m2snet.mlops.registry import find_version_by_key, register_model_version
from m2snet.mlops.tracking import Tracker, write_run_file
from m2snet.mlops.training_run import tracking_callbacks
from m2snet.runtime import git_commit
from m2snet.training.config import SELECTED, TrainConfig
from m2snet.training.trainer import train
from m2snet.workflows.context import UNTRACKED, RunContext
from m2snet.workflows.folds import log_fold_lineage, log_fold_model, log_training_artifacts
from m2snet.workflows.paper import FIXED_RUN_FILE, budget_of, paper_comparison, paper_results
from m2snet.workflows.presets import parse_overrides, train_config
from m2snet.workflows.steps import finalize_step

log = logging.getLogger("m2snet.workflows.protocols")


@dataclass(frozen=True)
class Protocol:
    """One of the paper's experiments.

    ``split``: keyword arguments of :func:`m2snet.data.fixed_split.make_fixed_split` (or
    ``{"n_folds": 4}`` for k-fold CV); ``fallback_split``: used when the dataset lacks what ``split``
    needs (e.g. a Kvasir-SEG copy without PraNet's subsets). ``train``: TrainConfig fields where the
    protocol's recipe differs from the defaults (the paper's shared recipe).
    """

    name: str
    description: str
    formats: tuple[str, ...]  # importers of the sources it runs on
    split: dict[str, Any]
    fallback_split: dict[str, Any] | None = None
    train: dict[str, Any] = field(default_factory=dict)
    notes: str = ""

    @property
    def kfold(self) -> bool:
        return "n_folds" in self.split


PROTOCOLS: dict[str, Protocol] = {p.name: p for p in (
    Protocol("busi", "BUSI four-fold CV (Tab. 4)", ("busi",), {"n_folds": 4},
             notes="The paper's epoch counts were lost in the text extraction; 50 is the reference script's."),
    Protocol("polyp", "train on the PraNet training set (900 Kvasir + 550 ClinicDB), test on CVC-ColonDB, "
             "ETIS-LaribPolypDB, Kvasir, CVC-300 and CVC-ClinicDB separately (Tab. 1)", ("pranet", "kvasir"),
             {}, fallback_split={"fractions": "900/0/100", "test_name": "Kvasir"},
             notes="On a dataset without PraNet's subsets (e.g. Kvasir-SEG alone) the split is a seeded, "
                   "cluster-grouped 900/100 of its cases with the test set named Kvasir; the paper trained on "
                   "1450 images (Kvasir + ClinicDB), so that row is not the paper's experiment."),
    Protocol("polyp-video", "video polyps: clips split 60 / 20 / 20 for train / validation / test (Tab. 2)",
             ("cvc-clinicdb", "folder"), {"fractions": "60/20/20", "group_by": "clip"},
             fallback_split={"fractions": "60/20/20", "group_by": "sequence"},
             # The validation set chooses the epoch (it is not the test set here).
             train={"selection": "fold_best"},
             notes="Groups by the manifest's 'clip' column, else 'sequence' (CVC-ClinicDB's video table)."),
    Protocol("covid", "COVID-19 lung infection, the Inf-Net split: 50 training and 48 test CT slices (Tab. 3)",
             ("covid-ct",), {"train": "subset:train", "tests": {"COVID": "subset:test"}},
             fallback_split={"fractions": "50/0/48", "test_name": "COVID"},
             notes="Uses the manifest's train/test subsets when the source has them, else a seeded 50/48 "
                   "split of the cases, which is NOT Inf-Net's. Inf-Net's 48 test slices (its list is not "
                   "shipped here) go in as a case-id file: `m2snet benchmark --protocol covid --test "
                   "COVID=ids:FILE` (or `m2snet data split --protocol fixed --test COVID=ids:FILE`, or the "
                   "pipeline's split_options='{\"tests\": {\"COVID\": \"ids:FILE\"}}'); every other "
                   "case trains."),
    Protocol("oct", "GOALS 2022 OCT layers, multi-class Dice and MED (Tab. 5)", ("goals",),
             {"fractions": "80/0/20", "test_name": "GOALS"},
             notes="The paper's figures are the challenge's leaderboard on its hidden test set; here a "
                   "seeded 80/20 split of the public training images, so the comparison is indicative only."),
)}


def get_protocol(name: str) -> Protocol:
    try:
        return PROTOCOLS[name]
    except KeyError:
        raise M2SNetError(f"unknown protocol {name!r}; choose one of {sorted(PROTOCOLS)}") from None


def registered_model_name(protocol: str) -> str:
    return f"m2snet-{protocol}"



def version_tags(protocol: str, mean: Mapping[str, float]) -> dict[str, str]:
    """A protocol model version's tags: the mean row over the test sets; the promotion gate's scores are
    its Dice and the no-skill predictor's Dice on the same cases (fractions)."""
    return {"m2snet.protocol": protocol, **{f"mean_{k}": f"{v:.4f}" for k, v in mean.items()},
            SCORE_TAG: f"{mean.get('dice', float('nan')):.6f}",
            NOSKILL_TAG: f"{mean.get(NOSKILL_PREFIX + 'dice', float('nan')):.6f}"}


def protocol_split(protocol: Protocol, data: str | os.PathLike, out: str | os.PathLike | None = None,
                   seed: int = 42, options: Mapping[str, Any] | None = None) -> Split:
    """The protocol's split of ``data``: its own recipe, or the fallback when the data lacks its subsets/columns.
    ``options``: :func:`~m2snet.data.fixed_split.make_fixed_split` arguments replacing the recipe (e.g.
    Inf-Net's COVID test list: ``{"tests": {"COVID": "ids:FILE"}}``, the rest training)."""
    if options:
        if protocol.kfold:
            raise M2SNetError(f"protocol {protocol.name!r} is k-fold CV: it takes no fixed-split sets")
        return make_fixed_split(data, seed=seed, out=out, **options)
    if protocol.kfold:
        return make_split(data, n_folds=protocol.split["n_folds"], seed=seed, out=out)
    try:
        return make_fixed_split(data, seed=seed, out=out, **protocol.split)
    except M2SNetError as err:
        if protocol.fallback_split is None:
            raise
        log.warning("protocol %s: %s; using its fallback split %s", protocol.name, err, protocol.fallback_split)
        return make_fixed_split(data, seed=seed, out=out, **protocol.fallback_split)


# --- fixed-split training + evaluation ------------------------------------------------------------


@dataclass
class FixedResult:
    report: TestSetReport
    out_dir: Path
    checkpoint: Path
    selected_epoch: int
    table_md: Path
    budget: dict[str, Any]
    run_id: str | None = None
    model_uri: str | None = None


def run_fixed(cfg: TrainConfig, out_dir: str | os.PathLike, *, tracking=None, run_name: str | None = None,
              tta_flip: bool = False, log_model: bool = True, protocol: str | None = None,
              resume: bool = False) -> FixedResult:
    """Train on the fixed split ``cfg.split`` (fold 0: training + validation sets) into ``out_dir`` and
    evaluate every named test set; one MLflow run (``tracking``) holds it all."""
    if not cfg.split:
        raise M2SNetError("a fixed-split run needs a split file (--split)")
    split = load_split(cfg.split)
    if not split.is_fixed:
        raise M2SNetError(f"{split.path}: a k-fold split; use `m2snet cv` (or --fold) for it")
    out = Path(out_dir)
    cfg = cfg.override(fold=0, out_dir=str(out))
    tracker = Tracker.start(tracking, run_name=run_name or f"fixed-{protocol or cfg.model}",
                            tags={"m2snet.kind": "fixed", "m2snet.protocol": protocol or "custom"}) \
        if tracking is not None else None
    with tracker or contextlib.nullcontext():
        if tracker is not None:
            tracker.log_params({"test_sets": ",".join(split.test_sets), "split_protocol": "fixed",
                                "split_crossings": len(split.crossings), "git_commit": git_commit()})
        result = train(cfg, resume=resume, callbacks=tracking_callbacks(tracker))
        report = evaluate_split_test_sets([result.checkpoint], cfg.data, split, out / "test", tta_flip=tta_flip,
                                          device=result.device, batch_size=max(1, cfg.batch_size),
                                          progress=cfg.progress)
        _, table_md = report.write(out, title=protocol or "test set")
        budget = budget_of(cfg, result)
        fr = FixedResult(report, out, result.checkpoint, result.selected_epoch, table_md, budget)
        if tracker is not None:
            log_training_artifacts(tracker, out)
            log_test_report(tracker, report, out, split, protocol, step=cfg.epochs)
            fr.run_id = tracker.run_id
            write_run_file(out / "mlflow_run.json", tracker)
            if log_model:
                fr.model_uri = log_fold_model(tracker, result.checkpoint, tta_flip=tta_flip)
            else:
                tracker.log_artifact(result.checkpoint, "checkpoints")
        write_json(out / FIXED_RUN_FILE, {"split": str(split.path), "split_sha256": split.sha256,
                                          "rows": report.rows, "mean": report.mean, "budget": budget,
                                          "checkpoint": str(result.checkpoint), "run_id": fr.run_id,
                                          "model_uri": fr.model_uri, "selected_epoch": result.selected_epoch})
    return fr


def log_test_report(tracker, report: TestSetReport, out: Path, split: Split, protocol: str | None,
                    step: int = 0, comparison: str = "") -> None:
    """One run's record of a fixed split's evaluation: ``<set>_<metric>`` and ``<set>_noskill_<metric>``
    metrics, the tables (``test/``), each set's per-case scores, and the table (+ ``comparison``) as the
    run's description."""
    tracker.log_metrics(report.flat_metrics(), step=step, flush=True)
    for path in (out / "test_sets.json", out / "test_sets.md"):
        tracker.log_artifact(path, "test")
    for ev in report.results.values():
        if ev.per_case_csv is not None:
            tracker.log_artifact(ev.per_case_csv, f"test/{ev.per_case_csv.parent.name}")
    tracker.set_description(f"Fixed split `{split.path.name}` ({len(split.test_sets)} test sets)\n\n"
                            + report.table(protocol or "test set") + (f"\n\n{comparison}" if comparison else ""))


# --- the fixed-split pipeline's steps (m2snet.kubeflow.pipelines.protocol) ---------------------------
#
# prepare (steps.prepare_dataset) -> split -> train (the split's training set, no tuning: the paper's
# recipe) -> evaluate every test set -> register -> promote (steps.promote_step); finalize closes the
# parent run. Every step takes the pipeline's RunContext and finds its parent MLflow run through it
# (RunContext.parent), as the CV steps do.


def split_step(dataset_dir: str, out_path: str, *, protocol: str, seed: int, split_options: str = "{}",
               ctx: RunContext = UNTRACKED) -> list[str]:
    """The protocol's fixed split of the dataset (``split_options``: JSON of
    :func:`~m2snet.data.fixed_split.make_fixed_split` arguments replacing its recipe, e.g.
    ``{"tests": {"COVID": "ids:/data/infnet-test.txt"}}``); return the test sets' names."""
    p = get_protocol(protocol)
    if p.kfold:
        raise M2SNetError(f"protocol {protocol!r} is k-fold CV: run the CV pipeline (preset {protocol})")
    split = protocol_split(p, dataset_dir, out=out_path, seed=seed, options=parse_overrides(split_options))
    parent = ctx.parent()
    if parent is not None:
        parent.set_tags({"m2snet.protocol": protocol, "m2snet.kind": "protocol"})
        parent.log_params({"protocol": protocol, "split_sha256": split.sha256, "split_protocol": "fixed",
                           "test_sets": ",".join(split.test_sets), "split_crossings": len(split.crossings)})
    return list(split.test_sets)


def train_step(dataset_dir: str, split_path: str, out_dir: str, *, protocol: str, preset: str,
               train_overrides: str = "{}", ctx: RunContext = UNTRACKED) -> dict[str, Any]:
    """Train on the split's training set (its validation set, if any, scored every epoch) as the parent's
    child run ``train``, with the preset's recipe, the protocol's differences on top and the user's
    overrides on top of those; the checkpoint in ``out_dir``."""
    fields = {**get_protocol(protocol).train, **parse_overrides(train_overrides)}
    cfg = train_config(preset, fields, data=dataset_dir, split=split_path, fold=0, out_dir=out_dir,
                       keep_last_checkpoint=False)
    parent = ctx.parent()
    run = parent.child("train", tags={"m2snet.protocol": protocol, "m2snet.kind": "fixed"}) if parent else None
    with run or contextlib.nullcontext():  # FINISHED, or FAILED / KILLED (Ctrl-C) on an error
        if run is not None:
            log_fold_lineage(run, parent, dataset_dir, split_path, 0)
        result = train(cfg, callbacks=tracking_callbacks(run))
        if run is not None:
            log_training_artifacts(run, out_dir)
    last_row = result.history[-1] if result.history else {}
    return {"model_metadata": {"checkpoint": SELECTED, "run_id": run.run_id if run else "", "protocol": protocol,
                               "selected_epoch": result.selected_epoch, "dataset_version": result.dataset_version,
                               "split_sha256": result.split_sha256,
                               "pretrained": result.pretrained_source or "none"},
            "metrics": {k: float(v) for k, v in last_row.items() if k.startswith("val_")}}


def evaluate_step(dataset_dir: str, split_path: str, model_dir: str, out_dir: str, *, protocol: str,
                  metric_protocol: str = DEFAULT_PROTOCOL, ctx: RunContext = UNTRACKED) -> dict[str, float]:
    """Score the trained checkpoint and the no-skill predictor on every test set: ``test_sets.md`` (one row
    per set + mean, each with its no-skill row) and ``paper_comparison.md`` in ``out_dir``, logged on the
    parent run (metrics ``<set>_<metric>``, ``<set>_noskill_<metric>``); returns those metrics."""
    checkpoint = Path(model_dir) / SELECTED
    if not checkpoint.is_file():
        raise M2SNetError(f"{model_dir}: no {SELECTED} checkpoint (the training step's Model artifact)")
    config = json.loads((Path(model_dir) / "train_config.json").read_text())
    split = load_split(split_path, load_dataset(dataset_dir), accept_version=config.get("accept_split_version"))
    out = Path(out_dir)
    report = evaluate_split_test_sets([checkpoint], dataset_dir, split, out / "test", protocol=metric_protocol)
    report.write(out, title=protocol)
    budget = {**budget_of(config), "train_cases": len(split.fold(0).train)
              if not config.get("max_train_cases") else min(config["max_train_cases"], len(split.fold(0).train))}
    comparison = paper_comparison(protocol, report.rows, budget) if protocol in paper_results()["protocols"] else ""
    write_text(out / "paper_comparison.md", f"{get_protocol(protocol).description}\n\n{comparison}\n")
    write_json(out / FIXED_RUN_FILE, {"split": str(split.path), "split_sha256": split.sha256, "rows": report.rows,
                                      "mean": report.mean, "budget": budget})
    parent = ctx.parent()
    if parent is not None:
        parent.log_params({"metric_protocol": metric_protocol})
        log_test_report(parent, report, out, split, protocol, comparison=comparison)
        parent.log_artifact(out / "paper_comparison.md", "report")
    return {k: float(v) for k, v in report.flat_metrics().items()}


def register_protocol_step(model_dir: str, report_dir: str, split_path: str, *, protocol: str, model_name: str = "",
                           dataset_version: str = "", metric_protocol: str = DEFAULT_PROTOCOL,
                           ctx: RunContext = UNTRACKED) -> tuple[str, str]:
    """Register the checkpoint as one version of ``model_name`` (default ``m2snet-<protocol>``), once per
    pipeline run, tagged with the test sets' mean row; return (name, version)."""
    name = model_name or registered_model_name(protocol)
    checkpoint = Path(model_dir) / SELECTED
    key = ctx.pipeline_run_id or f"ckpt-{sha256_file(checkpoint)[:12]}"
    existing = find_version_by_key(name, key)
    if existing is not None:
        return name, str(existing.version)
    result = json.loads((Path(report_dir) / FIXED_RUN_FILE).read_text())
    parent = ctx.parent()
    info = log_segmentation_model([checkpoint], name="model", run_id=parent.run_id if parent else None,
                                  tracking_uri=TrackingConfig().resolved_uri())
    tags = {**version_tags(protocol, result["mean"]), "data_version": dataset_version,
            "split_sha256": result["split_sha256"], "pipeline_run_id": ctx.pipeline_run_id or "manual",
            "metric_protocol": metric_protocol}
    description = "\n\n".join((Path(report_dir) / f).read_text() for f in ("test_sets.md", "paper_comparison.md"))
    mv = register_model_version(info.model_uri, name, idempotency_key=key, tags=tags, description=description)
    if parent is not None:
        parent.set_tags({"m2snet.registered_model": f"{name}/{mv.version}"})
    return name, str(mv.version)


def finalize_protocol_step(state: str, error_message: str = "", *, ctx: RunContext = UNTRACKED) -> str:
    """The exit handler: on success close the parent run keeping its description (the test-set table and
    the paper's figures, set by :func:`evaluate_step`) and return the registered version; on failure
    what :func:`m2snet.workflows.steps.finalize_step` does (the parent and open children FAILED, why)."""
    if state != "SUCCEEDED":
        return finalize_step(state, error_message, ctx=ctx)
    parent = ctx.parent(create=False)
    if parent is None:
        return ""
    parent.end("FINISHED")
    registered = parent.client.get_run(parent.run_id).data.tags.get("m2snet.registered_model", "")
    return registered.rpartition("/")[2]
