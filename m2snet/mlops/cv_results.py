"""A cross-validation's per-case results: the files a CV writes, and where to find them again.

Every CV (``m2snet cv`` and the pipeline's aggregate step) writes, beside its table,

- ``cv_per_case.csv``: one row per seed x fold x validation case (``seed, fold, case_id, label``,
  then every metric of :func:`m2snet.evaluation.metrics.case_metrics`);
- ``cv_lineage.json``: what the scores were computed on (``data_version``, ``split_sha256``,
  ``seeds``, ``folds``),

in its output directory and as the parent run's artifacts ``cv/``. :func:`load_cv_cases` reads them
back from any of the three ways a user names a CV: the output directory, the MLflow parent run id,
or a registered version (``models:/NAME/VERSION`` or ``models:/NAME@alias``: the version's run is
the pipeline's parent run; its tags carry the data version and split hash).
"""

from __future__ import annotations

import csv
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from m2snet.errors import M2SNetError
from m2snet.files import write_csv, write_json
from m2snet.mlops.mlflow_store import mlflow_client

CV_PER_CASE = "cv_per_case.csv"
CV_LINEAGE = "cv_lineage.json"
ARTIFACT_DIR = "cv"  # the parent run's artifact folder
LINEAGE_KEYS = ("data_version", "split_sha256")  # what must agree for two CVs to be paired


def per_case_rows(per_case_csv: str | os.PathLike, fold: int, seed: int | None) -> list[dict[str, str]]:
    """A fold's ``per_case.csv`` (from :func:`m2snet.evaluation.evaluate.evaluate`) as rows led by
    ``seed`` and ``fold``."""
    with open(per_case_csv, newline="") as f:
        return [{"seed": "" if seed is None else str(seed), "fold": str(fold), **row} for row in csv.DictReader(f)]


def write_cv_per_case(rows: Sequence[Mapping[str, Any]], out_dir: str | os.PathLike,
                      lineage: Mapping[str, Any]) -> tuple[Path, Path]:
    """``cv_per_case.csv`` and ``cv_lineage.json`` in ``out_dir``; returns their paths."""
    if not rows:
        raise M2SNetError(f"{out_dir}: no per-case results to write")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    columns = list(dict.fromkeys(k for r in rows for k in r))  # every column, in first-seen order
    write_csv(out / CV_PER_CASE, rows, columns)
    write_json(out / CV_LINEAGE, dict(lineage))
    return out / CV_PER_CASE, out / CV_LINEAGE


@dataclass
class CVCases:
    """One CV's per-case rows and what they were computed on."""

    source: str  # as the user named it
    rows: list[dict[str, str]] = field(repr=False)
    data_version: str | None
    split_sha256: str | None
    run_id: str | None = None  # the MLflow parent run, when the CV is tracked
    seeds: list[str] = field(default_factory=list)
    experiment: str | None = None  # the MLflow experiment of that run
    origins: list[str] = field(default_factory=list, repr=False)  # "FILE line N" of each row, for errors

    def lineage(self) -> dict[str, str | None]:
        return {"data_version": self.data_version, "split_sha256": self.split_sha256}


def _read_dir(directory: Path, source: str, fallback: Mapping[str, Any] | None = None,
              run_id: str | None = None, shown_as: str | None = None) -> CVCases:
    """``shown_as``: how errors name the CSV (a run's artifact is read from a temporary folder)."""
    csv_path = directory / CV_PER_CASE
    if not csv_path.is_file():
        raise M2SNetError(f"{source}: no {CV_PER_CASE} (written by `m2snet cv` and the pipeline since per-case "
                          "results are kept; re-run the CV)")
    shown_as = shown_as or str(csv_path)
    rows, origins = [], []
    with open(csv_path, newline="") as f:
        reader = csv.DictReader(f)
        for row in reader:
            rows.append(row)
            origins.append(f"{shown_as} line {reader.line_num}")
    if not rows:
        raise M2SNetError(f"{source}: {CV_PER_CASE} has no rows")
    for col in ("fold", "case_id"):
        if col not in rows[0]:
            raise M2SNetError(f"{source}: {CV_PER_CASE} has no {col!r} column")
    lineage: dict[str, Any] = {}
    if (directory / CV_LINEAGE).is_file():
        try:
            lineage = json.loads((directory / CV_LINEAGE).read_text())
        except json.JSONDecodeError as err:
            raise M2SNetError(f"{source}: {CV_LINEAGE} is not JSON ({err})") from err
    known = {**{k: v for k, v in (fallback or {}).items() if v}, **{k: v for k, v in lineage.items() if v}}
    seeds = sorted({r.get("seed", "") for r in rows})
    return CVCases(source=source, rows=rows, data_version=known.get("data_version"),
                   split_sha256=known.get("split_sha256"), run_id=run_id, seeds=seeds, origins=origins)


def _model_version(client, uri: str):
    from mlflow.exceptions import MlflowException

    spec = uri[len("models:/"):]
    try:
        if "@" in spec:
            name, alias = spec.split("@", 1)
            return client.get_model_version_by_alias(name, alias)
        name, _, version = spec.rpartition("/")
        if not name or not version.isdigit():
            raise M2SNetError(f"{uri}: expected models:/NAME/VERSION or models:/NAME@ALIAS")
        return client.get_model_version(name, version)
    except MlflowException as err:
        raise M2SNetError(f"{uri}: not found in the registry ({err.message})") from err


def _from_run(client, run_id: str, source: str, fallback: Mapping[str, Any] | None = None) -> CVCases:
    from mlflow.exceptions import MlflowException

    try:
        run = client.get_run(run_id)
        experiment = client.get_experiment(run.info.experiment_id).name
    except MlflowException as err:
        raise M2SNetError(f"{source}: not a CV directory, nor a models:/ URI, nor an MLflow run "
                          f"({err.message})") from err
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # two small files: no bars
    known = {k: run.data.params.get(k) for k in LINEAGE_KEYS}
    known.update({k: v for k, v in (fallback or {}).items() if v})
    with tempfile.TemporaryDirectory(prefix="m2snet-cv-") as tmp:
        for name in (CV_PER_CASE, CV_LINEAGE):
            try:
                client.download_artifacts(run_id, f"{ARTIFACT_DIR}/{name}", str(Path(tmp) / ARTIFACT_DIR))
            except Exception as err:  # MLflow raises several types for a missing artifact
                if name == CV_PER_CASE:
                    raise M2SNetError(f"{source}: run {run_id} has no artifact {ARTIFACT_DIR}/{name} (a CV parent "
                                      f"run logs it; runs from before per-case results were kept do not)") from err
        cases = _read_dir(Path(tmp) / ARTIFACT_DIR, source, known, run_id,
                          shown_as=f"{source}: run {run_id} artifact {ARTIFACT_DIR}/{CV_PER_CASE}")
    cases.experiment = experiment
    return cases


def version_cases(client, mv, source: str = "") -> CVCases:
    """The per-case results of a registered version (``mv``: an MLflow ModelVersion): its run's
    ``cv/`` artifacts; the version's tags name the data version and split when the artifacts do not."""
    source = source or f"models:/{mv.name}/{mv.version}"
    if not mv.run_id:
        raise M2SNetError(f"{source}: version {mv.version} records no run (not registered by a CV)")
    return _from_run(client, mv.run_id, source, {k: mv.tags.get(k) for k in LINEAGE_KEYS})


# Joins the parts of one CV run as separate jobs: ``runs/m2snet/seed42+runs/m2snet/seed43``.
JOIN = "+"


def load_cv_cases(source: str, tracking_uri: str | None = None) -> CVCases:
    """A CV's per-case results from a directory, an MLflow run id, or ``models:/NAME/VERSION|@alias``;
    ``A+B+...`` joins the seeds or folds of one CV run as several jobs (:func:`join_parts`)."""
    if JOIN in source and not Path(source).exists():
        return join_parts([load_cv_cases(part, tracking_uri) for part in source.split(JOIN)], source)
    if Path(source).is_dir():
        return _read_dir(Path(source), source)
    if not source.startswith("models:/") and (os.sep in source or source.startswith(".")):
        raise M2SNetError(f"{source}: directory not found")
    client = mlflow_client(tracking_uri)
    if source.startswith("models:/"):
        return version_cases(client, _model_version(client, source), source)
    return _from_run(client, source, source)


def join_parts(parts: Sequence[CVCases], source: str) -> CVCases:
    """One CV from parts run as separate jobs: its seeds (``m2snet cv --seeds 42`` and ``--seeds 43`` on two
    machines) or its folds (``--folds 0,1`` today, ``--folds 2,3`` in a later sitting). The parts must share
    the data version and split and hold disjoint (seed, fold) pairs, so that no case is counted twice."""
    first = parts[0]
    for part in parts[1:]:
        if part.lineage() != first.lineage():
            diff = ", ".join(f"{k} {first.lineage()[k]} vs {part.lineage()[k]}" for k in LINEAGE_KEYS
                             if first.lineage()[k] != part.lineage()[k])
            raise M2SNetError(f"{source}: {first.source} and {part.source} are not one CV ({diff})")
    owner: dict[tuple[str, str], str] = {}
    for part in parts:
        for seed, fold in sorted({(r.get("seed", ""), r["fold"]) for r in part.rows}):
            if (seed, fold) in owner:
                which = f"seed {seed}" if seed else "a CV without --seeds"
                raise M2SNetError(f"{source}: {which} is in both {owner[seed, fold]} and {part.source} (fold {fold})")
            owner[seed, fold] = part.source
    return CVCases(source=source, rows=[r for p in parts for r in p.rows], data_version=first.data_version,
                   split_sha256=first.split_sha256, seeds=sorted({s for s, _ in owner}),
                   origins=[o for p in parts for o in p.origins])
