"""The paper's experiments as named protocols: split recipe + training recipe + test sets + its numbers.

- :data:`PROTOCOLS` -- ``busi`` (four-fold CV, Tab. 4), ``polyp`` (the PraNet split, Tab. 1),
  ``polyp-video`` (clips 60 / 20 / 20, Tab. 2), ``covid`` (the Inf-Net split, Tab. 3) and ``oct``
  (GOALS layers, Tab. 5).
- :func:`run_fixed` -- train on a fixed split's training set (its validation set scored every epoch)
  and evaluate every named test set: ``test_sets.md`` (the paper's layout, one row per set + mean)
  and one MLflow run whose metrics are ``<set>_<metric>``.
- :func:`paper_comparison` -- ours beside the paper's figures (``paper_results.json``, only
  figures printed in the paper, with their table) with the difference and the budget.
- :func:`benchmark` -- import (if needed), split, train, evaluate and report, for one protocol.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Mapping

from m2snet.common import M2SNetError, git_commit, write_json, write_text
from m2snet.data.fixed_split import make_fixed_split
from m2snet.data.format import DATASET_JSON
from m2snet.data.split import Split, load_split, make_split
from m2snet.evaluation.testsets import TestSetReport, evaluate_split_test_sets
from m2snet.mlops.tracking import Tracker, tracking_callbacks, write_run_file
from m2snet.training.config import TrainConfig
from m2snet.workflows.context import RunContext
from m2snet.workflows.folds import log_fold_model, log_training_artifacts

log = logging.getLogger("m2snet.workflows.protocols")
PAPER_RESULTS = Path(__file__).with_name("paper_results.json")
FIXED_RUN_FILE = "fixed_result.json"


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
                   "split of the cases (not Inf-Net's list: give --test COVID=ids:FILE for that)."),
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


@lru_cache(maxsize=1)
def paper_results() -> dict[str, Any]:
    return json.loads(PAPER_RESULTS.read_text())


def protocol_split(protocol: Protocol, data: str | os.PathLike, out: str | os.PathLike | None = None,
                   seed: int = 42) -> Split:
    """The protocol's split of ``data``: its own recipe, or the fallback when the data lacks its subsets/columns."""
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


BUDGET_FIELDS = ("model", "epochs", "size", "batch_size", "multiscale", "lossnet_weight", "selection", "pretrained",
                 "max_train_cases")


def budget_of(cfg: TrainConfig | Mapping[str, Any], result=None) -> dict[str, Any]:
    """What a run spent: the knobs a reader needs to weigh our numbers against the paper's (a TrainConfig,
    or a train_config.json's dict, which may come from another m2snet version)."""
    values = cfg.to_dict() if isinstance(cfg, TrainConfig) else dict(cfg)
    out: dict[str, Any] = {k: values[k] for k in BUDGET_FIELDS if k in values}
    if result is not None:
        out.update({"pretrained_source": result.pretrained_source or "none (random init)",
                    "train_cases": len(result.train_cases), "device": result.device})
    return out


def run_fixed(cfg: TrainConfig, out_dir: str | os.PathLike, *, tracking=None, run_name: str | None = None,
              tta_flip: bool = False, log_model: bool = True, protocol: str | None = None,
              resume: bool = False) -> FixedResult:
    """Train on the fixed split ``cfg.split`` (fold 0: training + validation sets) into ``out_dir`` and
    evaluate every named test set; one MLflow run (``tracking``) holds it all."""
    from m2snet.training.trainer import train

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
            tracker.log_metrics(report.flat_metrics(), step=cfg.epochs, flush=True)
            for path in (out / "test_sets.json", table_md):
                tracker.log_artifact(path, "test")
            for ev in report.results.values():
                if ev.per_case_csv is not None:
                    tracker.log_artifact(ev.per_case_csv, f"test/{ev.per_case_csv.parent.name}")
            tracker.set_description(f"Fixed split `{split.path.name}` ({len(split.test_sets)} test sets)\n\n"
                                    + report.table(protocol or "test set"))
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


# --- the paper's numbers beside ours --------------------------------------------------------------


def _fmt(value: float, unit: str) -> str:
    return f"{value:.2f}" if unit.startswith("percent") else f"{value:.3f}"


def paper_comparison(protocol: str, ours: Mapping[str, Mapping[str, float]], budget: Mapping[str, Any],
                     percent: bool = False) -> str:
    """Markdown: for every test set the paper reports and we measured, each metric the paper prints --
    ours, the paper's, ours - paper -- then the budget. ``ours``: set -> metric means (fractions, or
    percent with ``percent``, as the paper's table is)."""
    entry = paper_results()["protocols"].get(protocol)
    if entry is None:
        raise M2SNetError(f"the paper reports no figures for protocol {protocol!r}")
    unit = entry["unit"]
    lines = [f"### {protocol}: ours vs the paper ({entry['table']}, M2SNet row)", "",
             "| test set | metric | ours | paper | ours - paper |", "|---|---|---|---|---|"]
    matched = 0
    for name, figures in entry["sets"].items():
        if name not in ours:
            continue
        for metric, paper_value in figures.items():
            if metric == "paper_name" or metric not in ours[name]:
                continue
            value = float(ours[name][metric]) * (1.0 if percent or not unit.startswith("percent") else 100.0)
            matched += 1
            label = name if figures["paper_name"] == name else f"{name} ({figures['paper_name']})"
            diff = value - paper_value
            lines.append(f"| {label} | {metric} | {_fmt(value, unit)} | {_fmt(paper_value, unit)} | "
                         f"{'+' if diff >= 0 else '-'}{_fmt(abs(diff), unit)} |")
    if not matched:
        lines.append(f"| (none of our test sets {sorted(ours)} is one the paper reports: "
                     f"{sorted(entry['sets'])}) | | | | |")
    lines += ["", "Budget: " + ", ".join(f"{k}={v}" for k, v in budget.items()),
              f"Paper figures: {entry['table']}, from {paper_results()['source']}. "
              "The paper trained at its full recipe (Res2Net-50 ImageNet weights, its epochs); a short or "
              "unpretrained run is not expected to match."]
    return "\n".join(lines)


def comparison_from_results(protocol: str, results: str | os.PathLike) -> str:
    """The paper-vs-ours report of a finished run: ``test_sets.json`` (a fixed run) or ``cv_summary.json``
    (a CV, BUSI), with the budget read from the run's ``train_config.json`` (``fold0/`` for a CV)."""
    path = Path(results)
    if not path.is_file():
        raise M2SNetError(f"{path}: results file not found (test_sets.json of a fixed run or cv_summary.json)")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise M2SNetError(f"{path}: invalid JSON ({err})") from None
    config = next((c for c in (path.parent / "train_config.json", path.parent / "fold0" / "train_config.json")
                   if c.is_file()), None)
    budget: dict[str, Any] = budget_of(json.loads(config.read_text())) if config else {"budget": "unknown"}
    if "rows" in data:
        return paper_comparison(protocol, data["rows"], budget)
    if "mean_percent" in data:
        label = "BUSI"
        budget["folds"] = f"{len(data.get('folds', []))} of {data.get('n_folds')}"
        return paper_comparison(protocol, {label: data["mean_percent"], f"{label} (std)": data["std_percent"]},
                                budget, percent=True)
    raise M2SNetError(f"{path}: neither a test_sets.json ('rows') nor a cv_summary.json ('mean_percent')")


# --- one entry: import, split, train, evaluate, report ---------------------------------------------


@dataclass
class BenchmarkResult:
    protocol: str
    table_md: Path
    comparison_md: Path
    run_id: str | None
    registered: str | None = None  # "<model name>/<version>"


def registered_model_name(protocol: str) -> str:
    return f"m2snet-{protocol}"


def register_protocol_model(protocol: str, fr: FixedResult, tracking, description: str) -> str:
    """Register the run's pyfunc model as a version of ``m2snet-<protocol>`` (once per run); the score
    the promotion gate reads is the mean Dice over the test sets."""
    import mlflow

    from m2snet.mlops.registry import SCORE_TAG, register_model_version

    if fr.model_uri is None or fr.run_id is None:
        raise M2SNetError(f"protocol {protocol}: the run logged no model to register")
    uri = tracking.resolved_uri()
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        from mlflow import MlflowClient

        tags = {"m2snet.protocol": protocol, "run_id": fr.run_id,
                **{f"mean_{k}": f"{v:.4f}" for k, v in fr.report.mean.items()},
                SCORE_TAG: f"{fr.report.mean.get('dice', float('nan')):.6f}"}
        mv = register_model_version(fr.model_uri, registered_model_name(protocol), idempotency_key=fr.run_id,
                                    tags=tags, description=description,
                                    client=MlflowClient(tracking_uri=uri, registry_uri=uri))
    finally:
        mlflow.set_tracking_uri(previous)
    return f"{registered_model_name(protocol)}/{mv.version}"


def _dataset(data: Path, fmt: str | None, out: Path, protocol: Protocol) -> Path:
    """``data`` itself when it is an m2snet dataset, else ``out/data`` imported from it with ``fmt``."""
    if (data / DATASET_JSON).is_file():
        return data
    dest = out / "data"
    if (dest / DATASET_JSON).is_file():
        return dest
    if fmt is None:
        raise M2SNetError(f"{data}: not an m2snet dataset (no {DATASET_JSON}); give --format "
                          f"({' or '.join(protocol.formats)}) to import it")
    from m2snet.data.importers import import_dataset

    import_dataset(fmt, data, dest, progress=False)
    return dest


def benchmark(protocol_name: str, data: str | os.PathLike, out_dir: str | os.PathLike, *, fmt: str | None = None,
              train_overrides: Mapping[str, Any] | None = None, seed: int = 42, tracking=None,
              log_model: bool = True) -> BenchmarkResult:
    """Run one protocol end to end into ``out_dir``; writes ``<table>.md`` and ``paper_comparison.md``."""
    protocol = get_protocol(protocol_name)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    root = _dataset(Path(data), fmt, out, protocol)
    split = protocol_split(protocol, root, out=out / "split.json", seed=seed)
    fields = {**protocol.train, **dict(train_overrides or {}), "data": str(root), "split": str(split.path),
              "seed": seed}
    cfg = TrainConfig.from_dict({**TrainConfig().to_dict(), **fields}, source=f"protocol {protocol.name!r}")
    if protocol.kfold:
        from m2snet.workflows.folds import run_cv

        res = run_cv(cfg, out / "cv", ctx=RunContext(tracking), run_name=f"benchmark-{protocol.name}",
                     log_models=log_model)
        ours = {"BUSI": res.summary.mean, "BUSI (std)": res.summary.std}
        comparison = paper_comparison(protocol.name, ours, budget_of(cfg), percent=True)
        table_md, run_id = out / "cv" / "cv_table.md", res.parent_run_id
    else:
        fr = run_fixed(cfg, out / "run", tracking=tracking, run_name=f"benchmark-{protocol.name}",
                       protocol=protocol.name, log_model=log_model)
        comparison = paper_comparison(protocol.name, fr.report.rows, fr.budget)
        table_md, run_id = fr.table_md, fr.run_id
    comparison_md = out / "paper_comparison.md"
    write_text(comparison_md, f"{protocol.description}\n\n{protocol.notes}\n\n{comparison}\n")
    registered = None
    if tracking is not None and run_id is not None:
        tracker = Tracker.start(tracking, run_id=run_id)
        tracker.set_description(table_md.read_text() + "\n\n" + comparison)
        tracker.log_artifact(comparison_md, "report")
        tracker.end("FINISHED")
        if log_model and not protocol.kfold:
            # k-fold (busi): the pipeline registers the folds' ensemble (m2snet pipeline run --preset busi).
            registered = register_protocol_model(protocol.name, fr, tracking, comparison)
    return BenchmarkResult(protocol.name, table_md, comparison_md, run_id, registered)
