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
- the fixed-split pipeline's steps (:func:`split_step`, :func:`train_step`, :func:`evaluate_step`,
  :func:`register_step`, :func:`finalize_step`), one per component of
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
from functools import lru_cache
from pathlib import Path
from typing import Any, Mapping

from m2snet.data.fixed_split import make_fixed_split
from m2snet.data.format import DATASET_JSON, load_dataset
from m2snet.data.split import Split, load_split, make_split
from m2snet.errors import M2SNetError
from m2snet.evaluation.metrics import DEFAULT_PROTOCOL, NOSKILL_PREFIX
from m2snet.evaluation.testsets import TestSetReport, evaluate_split_test_sets
from m2snet.files import read_json, write_json, write_text
from m2snet.hashing import sha256_file
from m2snet.mlops.mlflow_store import mlflow_client
from m2snet.mlops.tracking import Tracker, parent_run, write_run_file
from m2snet.mlops.training_run import tracking_callbacks
from m2snet.runtime import git_commit
from m2snet.training.config import SELECTED, TrainConfig
from m2snet.workflows.context import RunContext
from m2snet.workflows.folds import log_fold_lineage, log_fold_model, log_training_artifacts
from m2snet.workflows.presets import parse_overrides, train_config
from m2snet.workflows.steps import finalize_step as finalize_cv_step

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


@lru_cache(maxsize=1)
def paper_results() -> dict[str, Any]:
    return json.loads(PAPER_RESULTS.read_text())


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


BUDGET_FIELDS = ("model", "epochs", "size", "seed", "batch_size", "multiscale", "lossnet_weight", "selection",
                 "pretrained", "max_train_cases")


def budget_of(cfg: TrainConfig | Mapping[str, Any], result=None) -> dict[str, Any]:
    """What a run spent: the knobs a reader needs to weigh our numbers against the paper's (a TrainConfig,
    or a train_config.json's dict, which may come from another m2snet version)."""
    values = cfg.to_dict() if isinstance(cfg, TrainConfig) else dict(cfg)
    out: dict[str, Any] = {k: values[k] for k in BUDGET_FIELDS if k in values}
    if "seed" in out:
        out["seeds"] = str(out.pop("seed"))
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


# --- the paper's numbers beside ours --------------------------------------------------------------

# What every report states, "unknown" when a finished run's files do not say.
BUDGET_STATED = ("epochs", "size", "train_cases", "seeds", "pretrained")


def _fmt(value: float, unit: str) -> str:
    return f"{value:.2f}" if unit.startswith("percent") else f"{value:.3f}"


def budget_line(budget: Mapping[str, Any]) -> str:
    """``Budget: epochs=.., size=.., train_cases=.., seeds=.., pretrained=.., <the rest>``: the stated
    fields first, each present (``unknown`` when not recorded), so no report omits them."""
    stated = {k: budget.get(k, "unknown") for k in BUDGET_STATED}
    return "Budget: " + ", ".join(f"{k}={v}" for k, v in {**stated, **budget}.items())


def paper_comparison(protocol: str, ours: Mapping[str, Mapping[str, float]], budget: Mapping[str, Any],
                     percent: bool = False) -> str:
    """Markdown: for every test set the paper reports and we measured, each metric the paper prints --
    ours, the no-skill predictor's on the same cases, the paper's, ours - paper -- then the budget.
    ``ours``: set -> metric means (fractions, or percent with ``percent``, as the paper's table is), with
    the no-skill predictor's under ``noskill_<metric>`` (as evaluations and CV summaries hold them)."""
    entry = paper_results()["protocols"].get(protocol)
    if entry is None:
        raise M2SNetError(f"the paper reports no figures for protocol {protocol!r}")
    unit = entry["unit"]
    scale = 1.0 if percent or not unit.startswith("percent") else 100.0
    lines = [f"### {protocol}: ours vs the paper ({entry['table']}, M2SNet row)", "",
             "| test set | metric | ours | no skill | paper | ours - paper |", "|---|---|---|---|---|---|"]
    matched = 0
    for name, figures in entry["sets"].items():
        if name not in ours:
            continue
        for metric, paper_value in figures.items():
            if metric == "paper_name" or metric not in ours[name]:
                continue
            value = float(ours[name][metric]) * scale
            noskill = ours[name].get(NOSKILL_PREFIX + metric)
            matched += 1
            label = name if figures["paper_name"] == name else f"{name} ({figures['paper_name']})"
            diff = value - paper_value
            lines.append(f"| {label} | {metric} | {_fmt(value, unit)} | "
                         f"{'n/a' if noskill is None else _fmt(float(noskill) * scale, unit)} | "
                         f"{_fmt(paper_value, unit)} | {'+' if diff >= 0 else '-'}{_fmt(abs(diff), unit)} |")
    if not matched:
        lines.append(f"| (none of our test sets {sorted(ours)} is one the paper reports: "
                     f"{sorted(entry['sets'])}) | | | | | |")
    lines += ["", budget_line(budget),
              f"Paper figures: {entry['table']}, from {paper_results()['source']}. "
              "The paper trained at its full recipe (Res2Net-50 ImageNet weights, its epochs); a short or "
              "unpretrained run is not expected to match. No skill: the all-background predictor on the same "
              "cases (a model at or below it learnt nothing)."]
    return "\n".join(lines)


def _cv_summary_from_per_case(directory: Path) -> dict[str, Any]:
    """A CV summary rebuilt from ``cv_per_case.csv`` alone: the per-(seed, fold) case means aggregated as
    :func:`m2snet.workflows.folds.report_cv` does (no no-skill rows: the per-case file holds the model's)."""
    from m2snet.evaluation.metrics import mean_metrics
    from m2snet.mlops.cv_results import load_cv_cases
    from m2snet.workflows.folds import aggregate_cv

    cases = load_cv_cases(str(directory))
    groups: dict[tuple[str, str], list[dict[str, float]]] = {}
    skip = {"seed", "fold", "case_id", "label", "height", "width", "lesion", "pred_foreground_fraction"}
    for row in cases.rows:
        values = {}
        for k, v in row.items():
            if k not in skip and v not in ("", None):
                try:
                    values[k] = float(v)
                except ValueError:
                    pass
        groups.setdefault((row.get("seed", ""), row["fold"]), []).append(values)
    keys = sorted(groups, key=lambda g: (g[0], int(g[1])))
    summary = aggregate_cv([mean_metrics(groups[g]) for g in keys], [int(g[1]) for g in keys])
    n_folds = len({g[1] for g in keys})
    return {**summary.to_dict(), "n_folds": n_folds, "per_fold": [{"seed": s, "fold": int(f)} for s, f in keys]}


def _cv_budget(directory: Path, summary: Mapping[str, Any]) -> dict[str, Any]:
    """A CV's budget: its first fold's train_config.json, the seeds, and the training cases per fold
    (every case not in the fold's validation set, capped by ``max_train_cases``)."""
    from m2snet.mlops.cv_results import CV_LINEAGE, CV_PER_CASE

    config = next((c for c in (*sorted(directory.glob("fold*/train_config.json")), directory / "train_config.json",
                               *sorted(directory.glob("seed*/fold*/train_config.json"))) if c.is_file()), None)
    budget: dict[str, Any] = budget_of(read_json(config, "training config")) if config else {}
    seeds = sorted({str(r["seed"]) for r in summary.get("per_fold", []) if r.get("seed") not in (None, "")})
    if not seeds and (directory / CV_LINEAGE).is_file():
        lineage = read_json(directory / CV_LINEAGE, "CV lineage")
        seeds = [str(s) for s in lineage.get("seeds", []) if s not in (None, "")]
    if not seeds and config:
        seeds = [str(read_json(config, "training config").get("seed", "unknown"))]
    budget["seeds"] = ",".join(seeds) if seeds else "unknown"
    if (directory / CV_PER_CASE).is_file():
        import csv

        with open(directory / CV_PER_CASE, newline="") as f:
            rows = list(csv.DictReader(f))
        seed0 = rows[0].get("seed", "") if rows else ""
        val = [sum(1 for r in rows if r.get("seed", "") == seed0 and r["fold"] == k)
               for k in sorted({r["fold"] for r in rows}, key=int)]
        total = len({r["case_id"] for r in rows})
        train = sorted({min(total - v, budget.get("max_train_cases") or total) for v in val})
        budget["train_cases"] = f"{train[0]}" if len(train) == 1 else f"{train[0]}-{train[-1]} per fold"
    n_folds = summary.get("n_folds")
    split_file = read_json(config, "training config").get("split") if config else None
    if split_file and Path(split_file).is_file():  # the split knows what a CV of some of its folds trained on
        split = load_split(split_file)
        n_folds, cap = split.n_folds, budget.get("max_train_cases")
        train = sorted({min(len(split.fold(int(k)).train), cap or 10**9) for k in summary.get("folds", [])})
        if train:
            budget["train_cases"] = f"{train[0]}" if len(train) == 1 else f"{train[0]}-{train[-1]} per fold"
    checkpoint = config.parent / SELECTED if config else None
    if checkpoint is not None and checkpoint.is_file():  # what it started from, not what it asked for
        from m2snet.models.checkpoint import Checkpoint

        budget["pretrained_source"] = Checkpoint.load(checkpoint).pretrained_source or "none (random init)"
    budget["folds"] = f"{len(summary.get('folds', []))} of {n_folds}"
    return budget


def comparison_from_results(protocol: str, results: str | os.PathLike) -> str:
    """The paper-vs-ours report of a finished run, named by its output directory or results file:

    - a fixed run: ``test_sets.json`` (budget from ``fixed_result.json`` or ``train_config.json`` beside it);
    - a CV (BUSI): ``cv_summary.json``, or its directory -- ``cv_summary.json``, else rebuilt from
      ``cv_per_case.csv`` -- with the budget from ``fold0/train_config.json``, the seeds and the folds.
    """
    path = Path(results)
    if path.is_dir():
        found = next((path / n for n in ("test_sets.json", "cv_summary.json") if (path / n).is_file()), None)
        if found is None:
            from m2snet.mlops.cv_results import CV_PER_CASE

            if not (path / CV_PER_CASE).is_file():
                raise M2SNetError(f"{path}: no test_sets.json, cv_summary.json or {CV_PER_CASE} (the output "
                                  "directory of a fixed run or a CV)")
            summary = _cv_summary_from_per_case(path)
            return _cv_comparison(protocol, summary, _cv_budget(path, summary))
        path = found
    if not path.is_file():
        raise M2SNetError(f"{path}: results file not found (test_sets.json of a fixed run or cv_summary.json)")
    data = read_json(path, "results file")
    if "rows" in data:
        fixed = path.parent / FIXED_RUN_FILE
        if fixed.is_file() and "budget" in read_json(fixed, "run file"):
            budget = read_json(fixed, "run file")["budget"]
        else:
            config = path.parent / "train_config.json"
            budget = budget_of(read_json(config, "training config")) if config.is_file() else {}
        return paper_comparison(protocol, data["rows"], budget)
    if "mean_percent" in data:
        return _cv_comparison(protocol, data, _cv_budget(path.parent, data))
    raise M2SNetError(f"{path}: neither a test_sets.json ('rows') nor a cv_summary.json ('mean_percent')")


def _cv_comparison(protocol: str, summary: Mapping[str, Any], budget: Mapping[str, Any]) -> str:
    label = "BUSI"  # the paper's only CV protocol (Tab. 4)
    return paper_comparison(protocol, {label: summary["mean_percent"], f"{label} (std)": summary["std_percent"]},
                            budget, percent=True)


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


def version_tags(protocol: str, mean: Mapping[str, float]) -> dict[str, str]:
    """A protocol model version's tags: the mean row over the test sets; the promotion gate's scores are
    its Dice and the no-skill predictor's Dice on the same cases (fractions)."""
    from m2snet.mlops.promotion_gate import NOSKILL_TAG, SCORE_TAG

    return {"m2snet.protocol": protocol, **{f"mean_{k}": f"{v:.4f}" for k, v in mean.items()},
            SCORE_TAG: f"{mean.get('dice', float('nan')):.6f}",
            NOSKILL_TAG: f"{mean.get(NOSKILL_PREFIX + 'dice', float('nan')):.6f}"}


def register_protocol_model(protocol: str, fr: FixedResult, tracking, description: str) -> str:
    """Register the run's pyfunc model as a version of ``m2snet-<protocol>`` (once per run); the score
    the promotion gate reads is the mean Dice over the test sets."""
    import mlflow

    from m2snet.mlops.registry import register_model_version

    if fr.model_uri is None or fr.run_id is None:
        raise M2SNetError(f"protocol {protocol}: the run logged no model to register")
    uri = tracking.resolved_uri()
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        tags = {"run_id": fr.run_id, **version_tags(protocol, fr.report.mean)}
        mv = register_model_version(fr.model_uri, registered_model_name(protocol), idempotency_key=fr.run_id,
                                    tags=tags, description=description,
                                    client=mlflow_client(uri))
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
              log_model: bool = True, split_options: Mapping[str, Any] | None = None) -> BenchmarkResult:
    """Run one protocol end to end into ``out_dir``; writes ``<table>.md`` and ``paper_comparison.md``.
    ``split_options``: sets replacing the protocol's split recipe (see :func:`protocol_split`)."""
    protocol = get_protocol(protocol_name)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    root = _dataset(Path(data), fmt, out, protocol)
    split = protocol_split(protocol, root, out=out / "split.json", seed=seed, options=split_options)
    fields = {**protocol.train, **dict(train_overrides or {}), "data": str(root), "split": str(split.path),
              "seed": seed}
    cfg = TrainConfig.from_dict({**TrainConfig().to_dict(), **fields}, source=f"protocol {protocol.name!r}")
    if protocol.kfold:
        from m2snet.workflows.folds import run_cv

        res = run_cv(cfg, out / "cv", ctx=RunContext(tracking), run_name=f"benchmark-{protocol.name}",
                     log_models=log_model)
        comparison = comparison_from_results(protocol.name, out / "cv")
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


# --- the fixed-split pipeline's steps (m2snet.kubeflow.pipelines.protocol) ---------------------------
#
# prepare (steps.prepare_dataset) -> split -> train (steps.train_fold_step on the split's one fold, no
# tuning: the paper's recipe) -> evaluate every test set -> register -> promote (steps.promote_step);
# finalize closes the parent run. Every step finds the pipeline's parent MLflow run as the CV steps do.


def split_step(dataset_dir: str, out_path: str, *, protocol: str, seed: int, split_options: str = "{}",
               pipeline_run_id: str = "", experiment: str = "") -> list[str]:
    """The protocol's fixed split of the dataset (``split_options``: JSON of
    :func:`~m2snet.data.fixed_split.make_fixed_split` arguments replacing its recipe, e.g.
    ``{"tests": {"COVID": "ids:/data/infnet-test.txt"}}``); return the test sets' names."""
    p = get_protocol(protocol)
    if p.kfold:
        raise M2SNetError(f"protocol {protocol!r} is k-fold CV: run the CV pipeline (preset {protocol})")
    split = protocol_split(p, dataset_dir, out=out_path, seed=seed, options=parse_overrides(split_options))
    parent = parent_run(pipeline_run_id, experiment)
    if parent is not None:
        parent.set_tags({"m2snet.protocol": protocol, "m2snet.kind": "protocol"})
        parent.log_params({"protocol": protocol, "split_sha256": split.sha256, "split_protocol": "fixed",
                           "test_sets": ",".join(split.test_sets), "split_crossings": len(split.crossings)})
    return list(split.test_sets)


def train_step(dataset_dir: str, split_path: str, out_dir: str, *, protocol: str, preset: str,
               train_overrides: str = "{}", pipeline_run_id: str = "", experiment: str = "") -> dict[str, Any]:
    """Train on the split's training set (its validation set, if any, scored every epoch) as the parent's
    child run ``train``, with the preset's recipe, the protocol's differences on top and the user's
    overrides on top of those; the checkpoint in ``out_dir``."""
    from m2snet.training.trainer import train

    fields = {**get_protocol(protocol).train, **parse_overrides(train_overrides)}
    cfg = train_config(preset, fields, data=dataset_dir, split=split_path, fold=0, out_dir=out_dir,
                       keep_last_checkpoint=False)
    parent = parent_run(pipeline_run_id, experiment)
    run = parent.child("train", tags={"m2snet.protocol": protocol, "m2snet.kind": "fixed"}) if parent else None
    if run is not None:
        log_fold_lineage(run, parent, dataset_dir, split_path, 0)
    try:
        result = train(cfg, callbacks=tracking_callbacks(run))
        if run is not None:
            log_training_artifacts(run, out_dir)
            run.end("FINISHED")
    except BaseException:
        if run is not None:
            run.end("FAILED")
        raise
    last_row = result.history[-1] if result.history else {}
    return {"model_metadata": {"checkpoint": SELECTED, "run_id": run.run_id if run else "", "protocol": protocol,
                               "selected_epoch": result.selected_epoch, "dataset_version": result.dataset_version,
                               "split_sha256": result.split_sha256,
                               "pretrained": result.pretrained_source or "none"},
            "metrics": {k: float(v) for k, v in last_row.items() if k.startswith("val_")}}


def evaluate_step(dataset_dir: str, split_path: str, model_dir: str, out_dir: str, *, protocol: str,
                  metric_protocol: str = DEFAULT_PROTOCOL, pipeline_run_id: str = "",
                  experiment: str = "") -> dict[str, float]:
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
    parent = parent_run(pipeline_run_id, experiment)
    if parent is not None:
        parent.log_params({"metric_protocol": metric_protocol})
        log_test_report(parent, report, out, split, protocol, comparison=comparison)
        parent.log_artifact(out / "paper_comparison.md", "report")
    return {k: float(v) for k, v in report.flat_metrics().items()}


def register_step(model_dir: str, report_dir: str, split_path: str, *, protocol: str, model_name: str = "",
                  dataset_version: str = "", metric_protocol: str = DEFAULT_PROTOCOL, pipeline_run_id: str = "",
                  experiment: str = "") -> tuple[str, str]:
    """Register the checkpoint as one version of ``model_name`` (default ``m2snet-<protocol>``), once per
    pipeline run, tagged with the test sets' mean row; return (name, version)."""
    from m2snet.mlops.mlflow_store import TrackingConfig
    from m2snet.mlops.pyfunc_logging import log_segmentation_model
    from m2snet.mlops.registry import find_version_by_key, register_model_version

    name = model_name or registered_model_name(protocol)
    checkpoint = Path(model_dir) / SELECTED
    key = pipeline_run_id or f"ckpt-{sha256_file(checkpoint)[:12]}"
    existing = find_version_by_key(name, key)
    if existing is not None:
        return name, str(existing.version)
    result = json.loads((Path(report_dir) / FIXED_RUN_FILE).read_text())
    parent = parent_run(pipeline_run_id, experiment)
    info = log_segmentation_model([checkpoint], name="model", run_id=parent.run_id if parent else None,
                                  tracking_uri=TrackingConfig().resolved_uri())
    tags = {**version_tags(protocol, result["mean"]), "data_version": dataset_version,
            "split_sha256": result["split_sha256"], "pipeline_run_id": pipeline_run_id or "manual",
            "metric_protocol": metric_protocol}
    description = "\n\n".join((Path(report_dir) / f).read_text() for f in ("test_sets.md", "paper_comparison.md"))
    mv = register_model_version(info.model_uri, name, idempotency_key=key, tags=tags, description=description)
    if parent is not None:
        parent.set_tags({"m2snet.registered_model": f"{name}/{mv.version}"})
    return name, str(mv.version)


def finalize_step(state: str, error_message: str = "", *, pipeline_run_id: str = "", experiment: str = "") -> str:
    """The exit handler: on success close the parent run keeping its description (the test-set table and
    the paper's figures, set by :func:`evaluate_step`) and return the registered version; on failure
    what :func:`m2snet.workflows.steps.finalize_step` does (the parent and open children FAILED, why)."""
    if state != "SUCCEEDED":
        return finalize_cv_step(state, error_message, ctx=RunContext.for_pipeline(pipeline_run_id, experiment))
    parent = parent_run(pipeline_run_id, experiment, create=False)
    if parent is None:
        return ""
    parent.end("FINISHED")
    registered = parent.client.get_run(parent.run_id).data.tags.get("m2snet.registered_model", "")
    return registered.rpartition("/")[2]
