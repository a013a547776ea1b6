"""The Kubeflow pipeline's library side: presets, the step functions, compile / run locally / submit.

Each Kubeflow component (``components/``) calls exactly one ``*_step`` / ``prepare_dataset`` /
``split_dataset`` function below; so does the local run (through the kfp local runner, running
the very same components). Steps communicate through files (the kfp artifacts' paths) and
through MLflow, where every step of one pipeline run finds the run's PARENT MLflow run by the tag
``m2snet.pipeline_run_id`` (looked up or created: idempotent, so a retried step never opens a
second parent):

    parent run "pipeline-<id>"    params: preset, data version, split hash; metrics: cv_*; artifacts: cv/
      +- "tune"                   the Optuna study's run; plots
      |    +- "trial-0", ...      one per trial, per-epoch val Dice
      +- "fold-0" .. "fold-3"     training (per epoch) + evaluation at original size; artifacts
    registered model <name>       one version per pipeline run: the folds' ensemble pyfunc

Presets (``PRESETS``) fix the data source, the training knobs and the tuning budget; ``tiny`` is the
test preset, ``demo`` the README's first command (a few minutes on 2 CPU cores), ``busi`` the
real four-fold BUSI protocol on GPUs.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from m2snet import __version__
from m2snet.common import M2SNetError, git_commit, write_json
from m2snet.tracking import DatasetLineage

if TYPE_CHECKING:
    from m2snet.runview import RunView
    from m2snet.tracking import Tracker
    from m2snet.training.config import TrainConfig

log = logging.getLogger("m2snet.pipeline")

# The image every component runs in (docker/Dockerfile builds it with this tag).
COMPONENT_IMAGE = f"ghcr.io/m2snet/m2snet:{__version__}"
PIPELINE_RUN_TAG = "m2snet.pipeline_run_id"
DEFAULT_EXPERIMENT = "m2snet-busi-cv"
DEFAULT_MODEL_NAME = "m2snet-busi"
REPO_ROOT = Path(__file__).resolve().parents[1]


# --- presets ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PipelinePreset:
    name: str
    description: str
    train: dict[str, Any]  # TrainConfig fields (data/split/fold/out_dir are set by the steps)
    n_trials: int  # Optuna trials (all workers together)
    tune_epochs: int  # epochs per trial
    demo_cases_per_class: int = 8  # the built-in demo set, used when no data path / DVC revision is given
    demo_size: int = 128  # demo image side in px
    # Use the DVC-tracked demo dataset (data/demo, data.dvc) instead of generating one of
    # demo_cases_per_class / demo_size: the README's run then records the same data version as data.dvc.
    tracked_demo: bool = False
    promote_floor: float = 0.5
    promote_margin: float = 0.005
    n_folds: int = 4


PRESETS: dict[str, PipelinePreset] = {
    p.name: p
    for p in (
        PipelinePreset(
            name="tiny",
            description="tests: 12 demo cases at 64 px, 1 epoch, 2 trials of 1 epoch, no LossNet",
            train=dict(size=64, epochs=1, batch_size=4, multiscale=False, pretrained=False, lossnet_weight=0.0,
                       lossnet_pretrained=False, progress=False),
            n_trials=2, tune_epochs=1, demo_cases_per_class=4, demo_size=64, promote_floor=0.0,
        ),
        PipelinePreset(
            name="demo",
            description="first run on a laptop: the DVC-tracked demo set (data/demo, 26 cases) at 96 px, "
                        "2 epochs, per fold 2 tuning trials of 1 epoch, no LossNet (CPU)",
            train=dict(size=96, epochs=2, batch_size=4, lossnet_weight=0.0, progress=True),
            # Nested tuning runs one study per fold (4 studies): 1-epoch trials keep the first run short.
            n_trials=2, tune_epochs=1, tracked_demo=True, promote_floor=0.0,
        ),
        PipelinePreset(
            name="busi",
            description="BUSI four-fold CV with the paper's recipe (352 px, multi-scale, LossNet) on GPUs",
            # Epochs: the paper's BUSI count was lost in extraction; 50 is the reference script's.
            train=dict(size=352, epochs=50, batch_size=16, num_workers=4, progress=False),
            n_trials=20, tune_epochs=10, promote_floor=0.6, promote_margin=0.005,
        ),
    )
}


def get_preset(name: str) -> PipelinePreset:
    try:
        return PRESETS[name]
    except KeyError:
        raise M2SNetError(f"unknown pipeline preset {name!r}; choose one of {sorted(PRESETS)}") from None


def _overrides(text: str | Mapping[str, Any] | None) -> dict[str, Any]:
    if not text:
        return {}
    if isinstance(text, Mapping):
        return dict(text)
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise M2SNetError(f"train_overrides: not a JSON object ({err}): {text!r}") from None
    if not isinstance(value, dict):
        raise M2SNetError(f"train_overrides: expected a JSON object of TrainConfig fields, got {text!r}")
    return value


def train_config(preset: str, overrides: str | Mapping[str, Any] | None = None, **fields: Any) -> "TrainConfig":
    """The preset's TrainConfig with the user's overrides, then the step's own fields on top."""
    from m2snet.training.config import TrainConfig

    cfg = {**get_preset(preset).train, **_overrides(overrides), **fields}
    return TrainConfig.from_dict(cfg, source=f"preset {preset!r} + overrides")


# --- MLflow: the pipeline's parent run -----------------------------------------------------------
def parent_run(pipeline_run_id: str, experiment: str = "", create: bool = True) -> "Tracker | None":
    """The MLflow parent run of a pipeline run (found by tag; created on first use)."""
    from m2snet.tracking import Tracker, TrackingConfig, ensure_experiment, make_client, with_retry

    if not pipeline_run_id:
        return None
    cfg = TrackingConfig(experiment=experiment or DEFAULT_EXPERIMENT)
    client = make_client(cfg)
    exp_id = ensure_experiment(client, cfg)
    found = with_retry(lambda: client.search_runs(
        [exp_id], filter_string=f"tags.`{PIPELINE_RUN_TAG}` = '{pipeline_run_id}'", order_by=["start_time ASC"]),
        "find the pipeline's parent run", cfg)
    if found:
        return Tracker(client, found[0].info.run_id, cfg)
    if not create:
        return None
    return Tracker.start(cfg, run_name=f"pipeline-{pipeline_run_id}",
                         tags={PIPELINE_RUN_TAG: pipeline_run_id, "m2snet.kind": "pipeline"})


# --- steps (one per component) ------------------------------------------------------------------
def tracked_demo_dataset(path: Path | None = None) -> Path:
    """The DVC-tracked demo dataset (``data.dvc``), regenerated byte-identically when absent.

    A fresh clone has only ``data.dvc``; rebuilding from the fixed seed gives the same bytes, so
    the hash matches and the run's data lineage is the tracked version. A mismatch (the generator
    or its libraries changed) is reported, not hidden.
    """
    from m2snet.data.demo import build_demo_dataset
    from m2snet.data.versioning import dataset_version, tracked_version

    if path is None:
        # The checkout's data/demo (editable install); else the working directory's (an installed package).
        path = (REPO_ROOT if (REPO_ROOT / "data.dvc").is_file() else Path.cwd()) / "data" / "demo"
    if not (path / "dataset.json").is_file():
        log.info("%s absent: regenerating the demo dataset tracked by data.dvc", path)
        build_demo_dataset(path, overwrite=True)
    expected, actual = tracked_version(path), dataset_version(path)
    if expected and expected != actual:
        log.warning("%s: content hash %s differs from data.dvc's %s (run `dvc checkout` or "
                    "`m2snet data version %s`)", path, actual, expected, path)
    return path


def prepare_dataset(
    out_dir: str | os.PathLike,
    *,
    preset: str = "demo",
    data_path: str = "",
    dvc_repo: str = "",
    dvc_rev: str = "",
    dvc_path: str = "data/busi",
    importer: str = "busi",
    pipeline_run_id: str = "",
    experiment: str = "",
) -> str:
    """Materialise the pipeline's dataset in ``out_dir`` (m2snet format, validated); return its version.

    Source, first that applies: ``dvc_rev``/``dvc_repo`` (``dvc get`` of ``dvc_path`` at that
    revision), ``data_path`` (an m2snet dataset directory, or a raw layout for ``importer``), else
    the built-in demo set at the preset's size.
    """
    from m2snet.data.format import load_dataset
    from m2snet.data.importers import import_dataset
    from m2snet.data.validation import validate_dataset

    out = Path(out_dir)
    p = get_preset(preset)
    with tempfile.TemporaryDirectory(prefix="m2snet-prepare-") as tmp:
        source_desc: str
        where: dict[str, str]  # the dataset input's source in MLflow
        if dvc_rev or dvc_repo:
            from dvc.repo import Repo

            src = Path(tmp) / "dvc"
            repo = dvc_repo or str(REPO_ROOT)
            try:
                Repo.get(repo, dvc_path, out=str(src), rev=dvc_rev or None)
            except Exception as err:  # noqa: BLE001 - DVC raises many types; name the inputs
                raise M2SNetError(f"dvc get {repo} {dvc_path} --rev {dvc_rev or 'HEAD'} failed: {err}") from err
            source_desc = f"dvc:{repo}@{dvc_rev or 'HEAD'}:{dvc_path}"
            where = {"uri": repo, "dvc_rev": dvc_rev or "HEAD", "dvc_path": dvc_path}
        elif data_path:
            src = Path(data_path)
            if not src.is_dir():
                raise M2SNetError(f"data_path {src}: directory not found")
            source_desc = str(src)
            where = {"uri": str(src.resolve())}
        elif p.tracked_demo:
            src = tracked_demo_dataset()
            source_desc = f"data.dvc ({src})"
            repo_dir = src.parent.parent  # the checkout whose data.dvc tracks data/demo
            where = {"uri": str(repo_dir), "dvc_rev": git_commit(repo_dir), "dvc_path": "data/demo"}
        else:
            from m2snet.data.demo import make_demo_dataset

            src = make_demo_dataset(Path(tmp) / "demo", n_per_class=p.demo_cases_per_class, size=p.demo_size)
            source_desc = f"demo({p.demo_cases_per_class}/class, {p.demo_size}px)"
            where = {"uri": source_desc}
        if (src / "dataset.json").is_file():
            # Already in m2snet format (e.g. a DVC-tracked imported dataset): copy, then re-validate.
            if out.exists():
                shutil.rmtree(out)
            shutil.copytree(src, out)
            report = validate_dataset(out)
            if not report.success:
                raise M2SNetError(f"{source_desc}: dataset failed validation:\n{report.summary()}")
            info = load_dataset(out)
        else:
            info = import_dataset(importer, src, out, overwrite=True, progress=False)  # validates
    version = info.version
    log.info("prepared %d cases from %s: version %s", len(info.cases), source_desc, version)
    parent = parent_run(pipeline_run_id, experiment)
    if parent is not None:
        parent.log_params({"preset": preset, "data_source": source_desc, "data_version": version,
                           "n_cases": len(info.cases)})
        imported = "" if (src / "dataset.json").is_file() else importer
        # An import names the dataset after its output directory (the kfp artifact's): name it after the source.
        name = info.name if info.name != out.name else Path(where.get("dvc_path") or src).name
        parent.log_dataset(DatasetLineage(name=name, digest=version, **where, importer=imported,
                                          n_cases=len(info.cases)))
    return version


def split_dataset(dataset_dir: str | os.PathLike, out_path: str | os.PathLike, n_folds: int, seed: int) -> list[int]:
    """Write the K-fold split file; return the fold indices (what the pipeline fans out over)."""
    from m2snet.data.split import make_split

    split = make_split(dataset_dir, n_folds=n_folds, seed=seed, out=out_path)
    return list(range(split.n_folds))


def tune_step(
    dataset_dir: str,
    split_path: str,
    out_path: str,
    *,
    preset: str,
    train_overrides: str = "{}",
    n_trials: int = -1,
    storage: str = "",
    fold: int = 0,
    pipeline_run_id: str = "",
    experiment: str = "",
    workdir: str | None = None,
) -> str:
    """Nested tuning of ONE fold: a study on an inner split of ``fold``'s training cases; write its best params.

    The pipeline runs one per fold, inside the fold loop, so no fold is scored on cases that took
    part in choosing its learning rates.
    """
    from m2snet.cv import tune_fold
    from m2snet.tuning import TuningConfig

    p = get_preset(preset)
    work = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="m2snet-tune-"))
    base = train_config(preset, train_overrides, data=dataset_dir, split=split_path, fold=fold,
                        out_dir=str(work / "unused"))
    storage = storage or os.environ.get("M2SNET_OPTUNA_STORAGE", "")
    cfg = TuningConfig(
        n_trials=n_trials if n_trials > 0 else p.n_trials, epochs=p.tune_epochs,
        storage=storage or None, seed=base.seed,
        # One study per pipeline run unless the caller shares a named storage on purpose.
        study_name=f"m2snet-{pipeline_run_id}-fold{fold}" if pipeline_run_id else f"m2snet-fold{fold}",
    )
    try:
        result = tune_fold(base, fold, cfg, work, parent=parent_run(pipeline_run_id, experiment))
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
    pipeline_run_id: str = "",
    experiment: str = "",
) -> dict[str, Any]:
    """Train fold ``fold`` with ITS tuned learning rates as a child run of the parent; checkpoint in ``out_dir``."""
    from m2snet.cv import fit_fold, fold_tags
    from m2snet.training.trainer import LAST, SELECTED

    tuned = json.loads(Path(best_params_path).read_text())["best_params"] if best_params_path else {}
    # Explicit user overrides win over tuned values: the user asked for them.
    cfg = train_config(preset, train_overrides, data=dataset_dir, split=split_path, fold=fold, out_dir=out_dir)
    tuned = {k: v for k, v in tuned.items() if k not in _overrides(train_overrides)}
    parent = parent_run(pipeline_run_id, experiment)
    run = parent.child(f"fold-{fold}", tags=fold_tags(fold)) if parent else None
    log_fold_lineage(parent, run, split_path, fold)
    try:
        result = fit_fold(cfg, fold, out_dir, tracker=run, tuned=tuned)
        if run:
            run.end("FINISHED")  # evaluate_fold_step reopens it
    except BaseException:
        if run:
            run.end("FAILED")
        raise
    # last.pt (optimizer + RNG state) only serves --resume inside this pod: do not ship it.
    (Path(out_dir) / LAST).unlink(missing_ok=True)
    last_row = result.history[-1] if result.history else {}
    return {
        "model_metadata": {"fold": fold, "checkpoint": SELECTED, "run_id": run.run_id if run else "",
                           "selection": cfg.selection, "selected_epoch": result.selected_epoch,
                           "dataset_version": result.dataset_version, "split_sha256": result.split_sha256,
                           "pretrained": result.pretrained_source or "none"},
        "metrics": {k: float(v) for k, v in last_row.items() if k.startswith("val_")},
        "checkpoint": str(result.checkpoint),
    }


def log_fold_lineage(parent: "Tracker | None", run: "Tracker | None", split_path: str, fold: int) -> None:
    """A fold run logs its parent's dataset input, tagged with the fold and the split file's hash."""
    from m2snet.common import sha256_file

    if parent is None or run is None:
        return
    split_sha = sha256_file(split_path)
    parent.log_params({"split_sha256": split_sha})  # the same value from every fold: idempotent
    for lineage in parent.dataset_inputs():
        run.log_dataset(lineage, tags={"fold": fold, "split_sha256": split_sha})


def _fold_checkpoint(model_dir: str | os.PathLike) -> Path:
    from m2snet.training.trainer import SELECTED

    path = Path(model_dir) / SELECTED
    if not path.is_file():
        raise M2SNetError(f"{model_dir}: no {SELECTED} checkpoint (the training step's Model artifact)")
    return path


def evaluate_fold_step(dataset_dir: str, split_path: str, fold: int, model_dir: str, out_dir: str) -> dict[str, float]:
    """Score the fold's selected checkpoint on its validation cases (original size); log to the fold's run."""
    from m2snet.cv import fold_run, score_fold
    from m2snet.data.split import load_split

    val = load_split(split_path).fold(fold).val
    run = fold_run(model_dir)
    try:
        ev = score_fold(_fold_checkpoint(model_dir), dataset_dir, val, out_dir, tracker=run)
        if run:
            run.end("FINISHED")
    except BaseException:
        if run:
            run.end("FAILED")
        raise
    return {k: float(v) for k, v in ev.metrics.items()}


def aggregate_step(
    fold_metrics: Sequence[Mapping[str, float]],
    out_dir: str,
    *,
    pipeline_run_id: str = "",
    experiment: str = "",
) -> dict[str, float]:
    """The CV table (mean +- std in percent) -> ``out_dir/cv_table.md`` + ``cv_summary.json``; logged on the parent."""
    from m2snet.cv import aggregate_cv, write_cv_summary

    rows = [{k: float(v) for k, v in m.items() if isinstance(v, (int, float))} for m in fold_metrics]
    summary = aggregate_cv(rows)
    out = Path(out_dir)
    write_cv_summary(summary, [{"fold": k, **r} for k, r in enumerate(rows)], out, "CV")
    table = summary.table(title="CV")
    flat = summary.flat_metrics()
    parent = parent_run(pipeline_run_id, experiment)
    if parent is not None:
        parent.log_metrics(flat, flush=True)
        parent.log_artifact(out / "cv_table.md", "cv")
        parent.log_artifact(out / "cv_summary.json", "cv")
    log.info("cross-validation:\n%s", table)
    return flat


def register_step(
    model_dirs: Sequence[str],
    cv_metrics: Mapping[str, float],
    split_path: str,
    *,
    model_name: str,
    dataset_version: str,
    pipeline_run_id: str = "",
    experiment: str = "",
) -> str:
    """Register the folds' ensemble as ONE model version (once per pipeline run); return the version."""
    from m2snet.common import sha256_file
    from m2snet.pyfunc import log_segmentation_model
    from m2snet.registry import SCORE_TAG, describe_version, find_version_by_key, register_model_version
    from m2snet.tracking import TrackingConfig

    checkpoints = [_fold_checkpoint(d) for d in model_dirs]
    # The key: the pipeline run (a retried step) or, run by hand, the checkpoints themselves.
    key = pipeline_run_id or "ckpt-" + "-".join(sha256_file(c)[:12] for c in checkpoints)
    existing = find_version_by_key(model_name, key)
    if existing is not None:
        log.info("model %s version %s already registered for %s", model_name, existing.version, key)
        return str(existing.version)
    split_sha = sha256_file(split_path)
    cv_dice = cv_metrics.get("cv_dice_mean")
    tags = {
        "data_version": dataset_version, "split_sha256": split_sha, "pipeline_run_id": pipeline_run_id or "manual",
        "n_folds": len(checkpoints),
        **{k: f"{float(v):.4f}" for k, v in cv_metrics.items()},  # cv_<metric>_mean/_std, percent
        # The promotion gate's score: a fraction (0..1), like the --floor it is compared with.
        SCORE_TAG: f"{cv_dice / 100.0:.6f}" if cv_dice is not None else "nan",
    }
    parent = parent_run(pipeline_run_id, experiment)
    info = log_segmentation_model(checkpoints, name="model", run_id=parent.run_id if parent else None,
                                  tracking_uri=TrackingConfig().resolved_uri())
    description = describe_version(n_folds=len(checkpoints), dataset_version=dataset_version, split_sha256=split_sha,
                                   cv_metrics=cv_metrics, pipeline_run_id=pipeline_run_id)
    mv = register_model_version(info.model_uri, model_name, idempotency_key=key, tags=tags, description=description)
    if parent is not None:
        parent.set_tags({"m2snet.registered_model": f"{model_name}/{mv.version}"})
    return str(mv.version)


def promote_step(model_name: str, version: str, *, floor: float, margin: float, force: bool = False,
                 pipeline_run_id: str = "", experiment: str = "") -> bool:
    """Apply the promotion gate; record the decision on the parent run and close it."""
    from m2snet.registry import PromotionPolicy, promote

    decision = promote(model_name, version, PromotionPolicy(floor=floor, margin=margin), force=force)
    parent = parent_run(pipeline_run_id, experiment, create=False)
    if parent is not None:
        parent.set_tags({"m2snet.promotion": ("promoted: " if decision.promoted else "kept production: ")
                         + decision.reason})
        parent.end("FINISHED")
    return decision.promoted


def run_description(parent: "Tracker") -> str:
    """A finished pipeline run's description in MLflow (markdown): the CV table, the model and its fate."""
    run = parent.client.get_run(parent.run_id)
    tags, params = run.data.tags, run.data.params
    with tempfile.TemporaryDirectory() as tmp:
        try:
            table = Path(parent.client.download_artifacts(parent.run_id, "cv/cv_table.md", tmp)).read_text().strip()
        except Exception as err:  # noqa: BLE001 - the description is best effort; say what is missing
            table = f"(no CV table: {type(err).__name__})"
    lines = ["### Cross-validation (percent, mean ± std over folds)", "", table, ""]
    if tags.get("m2snet.registered_model"):
        decision = tags.get("m2snet.promotion", "not promoted")
        lines.append(f"- **Model:** `{tags['m2snet.registered_model']}` -- {decision}")
    if params.get("data_version"):
        lines.append(f"- **Data:** `{params['data_version']}` from {params.get('data_source', '?')}; "
                     f"split sha256 `{params.get('split_sha256', '?')[:16]}`")
    return "\n".join(lines)


def _close_open_children(parent: "Tracker") -> list[str]:
    """Mark the parent's still-RUNNING descendants FAILED (a fold whose task died); return all failed ones."""
    from m2snet.tracking import iter_child_runs

    failed, todo = [], [parent.run_id]
    while todo:
        for child in iter_child_runs(parent.client, todo.pop()):
            todo.append(child.info.run_id)
            if child.info.status == "RUNNING":
                parent.client.set_terminated(child.info.run_id, status="FAILED")
                failed.append(child.info.run_name)
            elif child.info.status == "FAILED":
                failed.append(child.info.run_name)
    return sorted(failed)


def finalize_step(state: str, error_message: str = "", *, pipeline_run_id: str = "", experiment: str = "") -> str:
    """The pipeline's exit handler: close the parent MLflow run whatever happened.

    Returns the registered model version (``""`` when the run failed or registered none): the
    pipeline's output, which KFP only takes from the top level, outside the exit handler's group.

    Success: the parent's description becomes the CV table and the promotion decision. Failure
    (any state but SUCCEEDED): still-running child runs and the parent are marked FAILED, with the
    error and the failed runs in tags and the description (the parent is created if the first step
    failed before making it, so every pipeline run is visible in MLflow).
    """
    parent = parent_run(pipeline_run_id, experiment, create=state != "SUCCEEDED")
    if parent is None:
        return ""
    if state == "SUCCEEDED":
        parent.set_description(run_description(parent))
        parent.end("FINISHED")
        registered = parent.client.get_run(parent.run_id).data.tags.get("m2snet.registered_model", "")
        return registered.rpartition("/")[2]
    failed_runs = _close_open_children(parent)
    parent.set_tags({"m2snet.status": state.lower(), "m2snet.error": error_message[:4000] or "(none given)",
                     **({"m2snet.failed_runs": ", ".join(failed_runs)} if failed_runs else {})})
    parent.set_description(f"**Pipeline {state}.** {error_message}"
                           + (f"\n\nFailed MLflow runs: {', '.join(failed_runs)}" if failed_runs else ""))
    parent.end("FAILED")
    return ""


# --- compile / local run / submit --------------------------------------------------------------
def _pipeline_module():
    """pipelines.busi_cv (it lives beside the package in a checkout, not inside it)."""
    if not (REPO_ROOT / "pipelines" / "busi_cv.py").is_file():
        raise M2SNetError(f"{REPO_ROOT}: pipelines/busi_cv.py not found; run the pipeline from an m2snet checkout")
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))
    import pipelines.busi_cv as module

    return module


def compiled_pipeline_path() -> Path:
    return REPO_ROOT / "pipelines" / "busi_cv.yaml"


def compile_pipeline(out: str | os.PathLike | None = None) -> Path:
    """Compile the cluster pipeline (GPU requests, limits, retries, Secrets) to YAML."""
    from kfp import compiler

    module = _pipeline_module()
    out = Path(out) if out else compiled_pipeline_path()
    compiler.Compiler().compile(module.build_pipeline(cluster=True), str(out))
    return out


@dataclass
class TaskSummary:
    label: str
    state: str  # done | failed | skipped | queued
    seconds: float | None
    log: Path


@dataclass
class LocalRunResult:
    model_name: str
    version: str
    pipeline_run_id: str
    parent_run_id: str | None
    production_version: str | None
    promoted: bool
    cv_table: str
    tracking_uri: str
    pipeline_root: Path
    seconds: float
    log_dir: Path | None = None
    tasks: list[TaskSummary] = field(default_factory=list)
    promotion: str = ""  # the promotion decision and its reason
    experiment_id: str = ""
    notes: list[str] = field(default_factory=list)  # warnings the run showed once (e.g. random init)

    def to_dict(self) -> dict[str, Any]:
        return {k: str(v) if isinstance(v, Path) else v for k, v in asdict(self).items()}

    def ui_links(self, base: str) -> dict[str, str]:
        """MLflow UI pages of this run under ``base`` (the UI's URL): the runs table, the parent run, the model.

        MLflow 3.17's UI picks an experiment's landing page from its GenAI / model-training switch
        (``workflowType``, kept in the browser), not from the experiment's kind tag: the links set it.
        """
        base, ml = base.rstrip("/"), "?workflowType=machine_learning"
        return {
            "runs": f"{base}/#/experiments/{self.experiment_id}/runs{ml}",
            "run": f"{base}/#/experiments/{self.experiment_id}/runs/{self.parent_run_id}{ml}",
            "model": f"{base}/#/models/{self.model_name}/versions/{self.version}{ml}",
        }


class PipelineTaskFailed(M2SNetError):
    """A task of a local pipeline run failed; the message names it, its error and its log file."""

    def __init__(self, message: str, task: str, log: Path, parent_run_id: str | None):
        super().__init__(message)
        self.task, self.log, self.parent_run_id = task, log, parent_run_id


_ERROR_LINE = re.compile(r"^\s*(?:[\w.]+\.)?(\w*(?:Error|Exception|Interrupt)\b.*)$")


def _error_line(log_tail: str) -> str:
    """The last exception of a task log (the traceback's last line, with its continuation lines) on one line."""
    lines = log_tail.splitlines()
    found = [i for i, line in enumerate(lines) if _ERROR_LINE.match(line)]
    if not found:
        return ""
    first = lines[found[-1]]
    indent = len(first) - len(first.lstrip())
    message = [_ERROR_LINE.match(first)[1]]
    for line in lines[found[-1] + 1:]:  # a multi-line message: its lines are indented deeper
        if not line.strip() or len(line) - len(line.lstrip()) <= indent:
            break
        message.append(line.strip())
    return " ".join(message)[:1000]


def _record_failure(view: "RunView", experiment: str, err: Exception) -> PipelineTaskFailed:
    """The local runner's side of a failure: the parent run names the failed task, its log tail and file."""
    from m2snet.tracking import TrackingError

    failed = view.failed[0] if view.failed else None
    if failed is None:  # the runner itself failed, not a task
        return PipelineTaskFailed(f"local pipeline run failed: {err} (runner log: {view.main_log})", "pipeline",
                                  view.main_log, None)
    tail = failed.tail()
    error = _error_line(tail) or "no exception in the log"
    parent_id = None
    try:
        parent = parent_run(view.pipeline_run_id, experiment, create=True)
        if parent is not None:
            parent_id = parent.run_id
            parent.set_tags({"m2snet.failed_task": failed.label, "m2snet.failed_log": str(failed.log),
                             "m2snet.error": error})
            parent.set_description(f"**Pipeline FAILED in task `{failed.label}`:** {error}\n\n"
                                   f"Log: `{failed.log}` (also an artifact of this run, logs/); its tail:\n\n"
                                   f"```\n{tail[-8000:]}\n```")
            parent.log_artifact(failed.log, "logs")
            parent.end("FAILED")
    except (M2SNetError, TrackingError, OSError) as record_err:  # the failure itself must still be reported
        log.error("could not record the failure on the MLflow parent run: %s", record_err)
    return PipelineTaskFailed(f"pipeline task '{failed.label}' failed: {error} -- full log: {failed.log}",
                              failed.label, failed.log, parent_id)


RUNNERS = ("subprocess", "container")


def _kfp_runner(runner: str, *, data_path: str, tracking_uri: str):
    """A context giving the kfp local runner: subprocesses here, or containers of COMPONENT_IMAGE."""
    import contextlib

    from kfp import local

    if runner == "container":
        from m2snet.container import container_runner

        return container_runner(COMPONENT_IMAGE, data_path=data_path, tracking_uri=tracking_uri)
    return contextlib.nullcontext(local.SubprocessRunner(use_venv=False))


def run_local(
    preset: str = "demo",
    *,
    data_path: str = "",
    dvc_repo: str = "",
    dvc_rev: str = "",
    importer: str = "busi",
    work_dir: str | os.PathLike = ".m2snet/pipeline",
    experiment: str = DEFAULT_EXPERIMENT,
    model_name: str = DEFAULT_MODEL_NAME,
    n_folds: int | None = None,
    n_trials: int = -1,
    seed: int = 42,
    train_overrides: Mapping[str, Any] | None = None,
    tuning_storage: str = "",
    floor: float | None = None,
    margin: float | None = None,
    threads: int | None = None,
    display: str = "plain",
    runner: str = "subprocess",
) -> LocalRunResult:
    """Run the pipeline on the kfp local runner: ``runner`` "subprocess" (this Python environment) or
    "container" (every step in COMPONENT_IMAGE through docker/podman, see m2snet.container).

    The local runner executes the same components, ParallelFor fan-out, Collected fan-in and exit
    handler as a cluster (at most two loop iterations at once); GPU requests, limits, retries and
    Secrets are left out of the local variant. MLflow: ``$MLFLOW_TRACKING_URI`` or
    ``sqlite:///mlflow.db`` (made absolute, so every task subprocess writes to the same store).

    Console (``display``, see :class:`m2snet.runview.RunView`): ``"live"`` a live task table,
    ``"plain"`` a line per task start/end, ``"stream"`` everything the runner prints, ``"auto"``
    live on a terminal else plain. Every task's full output is in ``<work_dir>/logs/<time>/<task>.log``.
    A failed task raises :class:`PipelineTaskFailed` naming it and its log, after the parent MLflow
    run was marked FAILED with the log's tail.
    """
    from kfp import local

    from m2snet.registry import PRODUCTION, find_version_by_key, version_by_alias
    from m2snet.runview import RunView
    from m2snet.tracking import DEFAULT_TRACKING_URI

    from m2snet.data.importers import list_importers

    if runner not in RUNNERS:
        raise M2SNetError(f"unknown runner {runner!r}; choose one of {list(RUNNERS)}")
    p = get_preset(preset)
    if importer not in list_importers():  # fail before starting anything
        raise M2SNetError(f"--importer {importer!r}: unknown layout; choose one of {list_importers()}")
    uri = os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = f"sqlite:///{Path(uri[len('sqlite:///'):]).resolve()}"
    os.environ["MLFLOW_TRACKING_URI"] = uri
    work = Path(work_dir).resolve()
    root = work / "kfp"
    root.mkdir(parents=True, exist_ok=True)
    module = _pipeline_module()
    pipeline_fn = module.build_pipeline(cluster=False, local_threads=threads or max(1, (os.cpu_count() or 2) // 2))
    folds = n_folds or p.n_folds
    if data_path and runner == "container":
        data_path = str(Path(data_path).resolve())  # mounted at the same path; the step's cwd is not ours
    arguments = dict(
        preset=preset, data_path=data_path, dvc_repo=dvc_repo, dvc_rev=dvc_rev, importer=importer, n_folds=folds,
        seed=seed, n_trials=n_trials, tuning_storage=tuning_storage,
        train_overrides=json.dumps(dict(train_overrides or {})), experiment=experiment, model_name=model_name,
        promote_floor=p.promote_floor if floor is None else floor,
        promote_margin=p.promote_margin if margin is None else margin,
    )
    view = RunView(work / "logs" / time.strftime("%Y%m%d-%H%M%S"), n_folds=folds,
                   n_trials=n_trials if n_trials > 0 else p.n_trials, mode=display)
    # MLflow's artifact download bars (the CV table, the registered model) would cut through the console.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    t0 = time.perf_counter()
    import warnings

    failure: Exception | None = None
    with warnings.catch_warnings(), view, _kfp_runner(runner, data_path=data_path, tracking_uri=uri) as kfp_runner:
        view.header(f"m2snet pipeline: preset {preset}, {folds} folds, MLflow {uri}, runner {runner}\nlogs: {view.log_dir}/")
        log.info("local pipeline run: preset %s, MLflow %s, kfp root %s, runner %s", preset, uri, root, runner)
        # The SubprocessRunner warns that our image name has no "python" in it: we run in this env.
        warnings.filterwarnings("ignore", message=".*non-Python base image.*")
        local.init(runner=kfp_runner, pipeline_root=str(root), raise_on_error=True)
        try:
            task = pipeline_fn(**arguments)
        except RuntimeError as err:  # the local runner's "inner task failed"
            failure = err
            view.mark_skipped()
    seconds = time.perf_counter() - t0
    if failure is not None or view.failed:
        raise _record_failure(view, experiment, failure or RuntimeError("a task failed")) from failure
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    outputs = getattr(task, "outputs", {}) or {}
    version = outputs.get("Output") if isinstance(outputs, dict) else getattr(task, "output", "")
    version = str(version) if version else ""
    if not version and view.pipeline_run_id:
        mv = find_version_by_key(model_name, view.pipeline_run_id, client)
        version = str(mv.version) if mv is not None else ""
    if not version:
        raise M2SNetError(f"local pipeline run finished but registered no version of {model_name!r} "
                          f"(runner log: {view.main_log})")
    mv = client.get_model_version(model_name, version)
    pipeline_run_id = mv.tags.get("pipeline_run_id", "")
    parent = parent_run(pipeline_run_id, experiment, create=False)
    prod = version_by_alias(model_name, PRODUCTION, client)
    table = ""
    if parent is not None:
        with tempfile.TemporaryDirectory() as tmp:
            try:
                table = Path(client.download_artifacts(parent.run_id, "cv/cv_table.md", tmp)).read_text()
            except Exception as err:  # noqa: BLE001 - the table is a convenience here
                log.warning("could not read the CV table of run %s: %s", parent.run_id, err)
    exp = client.get_experiment_by_name(experiment)
    return LocalRunResult(
        model_name=model_name, version=version, pipeline_run_id=pipeline_run_id,
        parent_run_id=parent.run_id if parent else None,
        production_version=str(prod.version) if prod is not None else None,
        promoted=prod is not None and str(prod.version) == version, cv_table=table.strip(), tracking_uri=uri,
        pipeline_root=root, seconds=seconds, log_dir=view.log_dir,
        tasks=[TaskSummary(t.label, t.state, t.seconds, t.log) for t in view.tasks.values()],
        promotion=mv.tags.get("promotion_decision", ""), experiment_id=exp.experiment_id if exp else "",
        notes=list(view.notes),
    )


def pipeline_parameters(package: str | os.PathLike | None = None) -> dict[str, str]:
    """Name -> KFP parameter type of the compiled pipeline's inputs."""
    import yaml

    path = Path(package) if package else compiled_pipeline_path()
    if not path.is_file():
        raise M2SNetError(f"{path}: compiled pipeline not found (run `m2snet pipeline compile`)")
    # Document 1: the PipelineSpec; document 2 (if any): the Kubernetes platform spec.
    spec = next(iter(yaml.safe_load_all(path.read_text())), None) or {}
    params = spec.get("root", {}).get("inputDefinitions", {}).get("parameters", {})
    return {name: d.get("parameterType", "STRING") for name, d in params.items()}


def parse_params(items: Sequence[str], package: str | os.PathLike | None = None) -> dict[str, Any]:
    """``k=v`` strings -> typed pipeline arguments, checked against the compiled pipeline's inputs."""
    known = pipeline_parameters(package)
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise M2SNetError(f"--param {item!r}: expected NAME=VALUE")
        if key not in known:
            raise M2SNetError(f"--param {key}: not a parameter of the pipeline; known: {sorted(known)}")
        kind = known[key]
        try:
            if kind == "NUMBER_INTEGER":
                out[key] = int(raw)
            elif kind == "NUMBER_DOUBLE":
                out[key] = float(raw)
            elif kind == "BOOLEAN":
                if raw.lower() not in ("true", "false", "1", "0"):
                    raise ValueError(raw)
                out[key] = raw.lower() in ("true", "1")
            else:
                out[key] = raw
        except ValueError:
            raise M2SNetError(f"--param {key}={raw}: expected a {kind.lower().replace('_', ' ')}") from None
    return out


def submit(
    host: str,
    *,
    params: Mapping[str, Any] | None = None,
    experiment: str = DEFAULT_EXPERIMENT,
    run_name: str | None = None,
    namespace: str | None = None,
    package: str | os.PathLike | None = None,
    timeout_s: float = 15.0,
) -> tuple[str, str]:
    """Submit the compiled pipeline to a KFP endpoint; return (run id, run URL)."""
    from urllib.parse import urlparse

    package = Path(package) if package else compiled_pipeline_path()
    if not package.is_file():
        raise M2SNetError(f"{package}: compiled pipeline not found (run `m2snet pipeline compile`)")
    url = urlparse(host if "://" in host else f"http://{host}")
    if url.scheme not in ("http", "https") or not url.hostname:
        raise M2SNetError(f"--host {host!r}: expected an http(s) URL of the Kubeflow Pipelines API")
    # Fail fast and clearly: kfp.Client retries its health check for half a minute with tracebacks.
    import requests

    health = f"{host.rstrip('/')}/apis/v2beta1/healthz"
    try:
        resp = requests.get(health, timeout=timeout_s)
    except requests.RequestException as err:
        raise M2SNetError(f"Kubeflow Pipelines endpoint {host} is unreachable ({type(err).__name__}: {err}); "
                          "check --host (e.g. `kubectl port-forward -n kubeflow svc/ml-pipeline-ui 8080:80`)") from None
    if resp.status_code != 200:
        raise M2SNetError(f"{host} does not look like a Kubeflow Pipelines v2 API: GET {health} answered "
                          f"HTTP {resp.status_code}")
    import kfp

    try:
        client = kfp.Client(host=host, namespace=namespace)
        result = client.create_run_from_pipeline_package(
            str(package), arguments=dict(params or {}), run_name=run_name, experiment_name=experiment,
            namespace=namespace,
        )
    except Exception as err:  # noqa: BLE001 - HTTP/auth errors of the KFP API
        raise M2SNetError(f"submitting {package.name} to {host} failed: {type(err).__name__}: {err}") from err
    base = host.rstrip("/")
    return result.run_id, f"{base}/#/runs/details/{result.run_id}"
