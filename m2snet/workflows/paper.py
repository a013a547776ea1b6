"""The paper's numbers beside ours: its figures (``paper_results.json``, only figures printed in the paper,
with their table), what a run spent (its budget), and the comparison of a run -- fixed split or CV -- with
the paper's M2SNet row: ours, the no-skill predictor's on the same cases, the paper's, the difference."""

from __future__ import annotations

import csv
import json
import os
from functools import lru_cache
from pathlib import Path
from typing import Any, Mapping

from m2snet.data.split import load_split
from m2snet.errors import M2SNetError
from m2snet.evaluation.metrics import NOSKILL_PREFIX, mean_metrics
from m2snet.files import read_json
from m2snet.mlops.cv_results import CV_LINEAGE, CV_PER_CASE, load_cv_cases
from m2snet.models.checkpoint import Checkpoint
from m2snet.training.config import SELECTED, TrainConfig
from m2snet.workflows.cv_summary import summarize_cv

FIXED_RUN_FILE = "fixed_result.json"  # a fixed run's result: its rows, mean and budget
PAPER_RESULTS = Path(__file__).with_name("paper_results.json")
# The paper's Tab. 4 (BUSI, M2SNet), in percent: (mean, std).
PAPER_BUSI_M2SNET = {"iou": (71.52, 1.19), "precision": (84.00, 0.55), "recall": (79.97, 1.65),
                     "specificity": (98.35, 0.20), "dice": (79.21, 1.28)}


@lru_cache(maxsize=1)
def paper_results() -> dict[str, Any]:
    return json.loads(PAPER_RESULTS.read_text())


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


NOSKILL_METRICS = ("dice", "iou", "precision", "recall", "specificity")


def _cv_summary_from_per_case(directory: Path) -> dict[str, Any]:
    """A CV summary rebuilt from ``cv_per_case.csv`` alone: the per-(seed, fold) case means aggregated as
    the CV report does; the no-skill (all-background) predictor's scores follow from each case's ``lesion``
    column (1 on a case without a lesion, 0 on one with; specificity 1), as the evaluation computes them."""
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
        if row.get("lesion") in ("0", "1"):
            for metric in NOSKILL_METRICS:
                values[NOSKILL_PREFIX + metric] = 1.0 if metric == "specificity" or row["lesion"] == "0" else 0.0
        groups.setdefault((row.get("seed", ""), row["fold"]), []).append(values)
    keys = sorted(groups, key=lambda g: (g[0], int(g[1])))
    summary = summarize_cv([mean_metrics(groups[g]) for g in keys], [int(g[1]) for g in keys])
    n_folds = len({g[1] for g in keys})
    return {**summary.to_dict(), "n_folds": n_folds, "per_fold": [{"seed": s, "fold": int(f)} for s, f in keys]}


def _cv_budget(directory: Path, summary: Mapping[str, Any]) -> dict[str, Any]:
    """A CV's budget: its first fold's train_config.json, the seeds, and the training cases per fold
    (every case not in the fold's validation set, capped by ``max_train_cases``)."""
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
    fold_result = config.parent / "fold_result.json" if config else None
    if checkpoint is not None and checkpoint.is_file():  # what it started from, not what it asked for
        budget["pretrained_source"] = Checkpoint.load(checkpoint).pretrained_source or "none (random init)"
    elif fold_result is not None and fold_result.is_file():
        budget["pretrained_source"] = read_json(fold_result, "fold result").get("pretrained_source", "not recorded")
    elif budget.get("pretrained"):
        budget["pretrained_source"] = "not recorded (no checkpoint beside the config)"
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
