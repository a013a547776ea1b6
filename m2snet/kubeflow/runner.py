"""Run the Kubeflow pipeline locally, on the kfp local runner (compile and submit: :mod:`m2snet.kubeflow.cluster`).

The Kubeflow side sits above the library: only ``m2snet.kubeflow`` (and the CLI that fronts it)
imports kfp; the step functions it runs live in :mod:`m2snet.workflows.steps`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping

from m2snet.data.importers import list_importers
from m2snet.errors import M2SNetError
from m2snet.evaluation.metrics import DEFAULT_PROTOCOL, check_protocol
from m2snet.kubeflow.container import container_runner
from m2snet.kubeflow.image import COMPONENT_IMAGE
from m2snet.kubeflow.process_state import environment, environment_defaults
from m2snet.kubeflow.runview import RunView, planned_tasks
from m2snet.mlops.mlflow_store import (
    DEFAULT_TRACKING_URI,
    PIPELINE_EXPERIMENT,
    TrackingError,
    absolute_sqlite_uri,
    mlflow_client,
)
from m2snet.mlops.registry import PRODUCTION, find_version_by_key, version_by_alias
from m2snet.mlops.tracking import parent_run
from m2snet.processes import Interruption, stop_children_on_signal
from m2snet.redaction import redact
from m2snet.signals import Terminated
from m2snet.workflows.context import RunContext
from m2snet.workflows.presets import DEFAULT_MODEL_NAME, DEFAULT_PRESET, get_preset
from m2snet.workflows.steps import finalize_step, loop_items, parse_seeds

log = logging.getLogger("m2snet.kubeflow")


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
    table: str  # the CV table (folds), or the test-set table of a fixed-split protocol
    tracking_uri: str
    pipeline_root: Path
    seconds: float
    log_dir: Path | None = None
    tasks: list[TaskSummary] = field(default_factory=list)
    promotion: str = ""  # the promotion decision and its reason
    experiment_id: str = ""
    notes: list[str] = field(default_factory=list)  # warnings the run showed once (e.g. random init)
    table_title: str = "Cross-validation (percent, mean ± std over folds)"
    comparison: str = ""  # a fixed-split protocol's paper_comparison.md: the paper's figures beside ours
    intermediates_removed: bool = False  # pipeline_root was removed after the run (no --keep-intermediates)

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


def _record_failure(view: "RunView", experiment: str, err: Exception) -> PipelineTaskFailed:
    """The local runner's side of a failure: the parent run names the failed task, its log tail and file."""
    failed = view.failed[0] if view.failed else None
    if failed is None:  # the runner itself failed, not a task
        return PipelineTaskFailed(f"local pipeline run failed: {err} (runner log: {view.main_log})", "pipeline",
                                  view.main_log, None)
    tail = failed.tail()
    error = failed.error or "the task reported no exception (killed?)"
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


def _record_interruption(view: "RunView", experiment: str, interruption: Interruption, seconds: float) -> str:
    """Ctrl-C or SIGTERM stopped a local run (its task processes are gone by now): close its parent MLflow run
    and the runs its tasks left open as KILLED, saying why; the console's one line."""
    reason = f"interrupted by {interruption.signal or 'SIGINT (Ctrl-C)'} after {seconds:.0f} s"
    closed = ""
    if view.pipeline_run_id:
        try:
            finalize_step("CANCELED", f"{reason}; {interruption.stopped} processes stopped",
                          ctx=RunContext.for_pipeline(view.pipeline_run_id, experiment))
            closed = f"; MLflow run pipeline-{view.pipeline_run_id} marked KILLED"
        except Exception as err:  # noqa: BLE001 - whatever MLflow raises, the interruption must still be reported
            log.error("could not close the MLflow runs of the interrupted pipeline: %s", redact(str(err)))
            closed = f"; MLflow run pipeline-{view.pipeline_run_id} NOT closed ({type(err).__name__})"
    return f"{reason}: {interruption.stopped} processes stopped{closed} (logs: {view.log_dir}/)"


RUNNERS = ("subprocess", "container")


def _kfp_runner(runner: str, *, data_path: str, tracking_uri: str):
    """A context giving the kfp local runner: subprocesses here, or containers of COMPONENT_IMAGE."""
    from kfp import local

    if runner == "container":
        return container_runner(COMPONENT_IMAGE, data_path=data_path, tracking_uri=tracking_uri)
    return contextlib.nullcontext(local.SubprocessRunner(use_venv=False))


@dataclass
class LocalRunOptions:
    """What a local pipeline run does (``m2snet pipeline run --local`` builds one from its options).

    Each field is a pipeline parameter or a setting of the local runner; ``None`` means the preset's value.
    """

    preset: str = DEFAULT_PRESET
    data_path: str = ""  # a dataset (m2snet format or a raw layout, see importer); "" = the demo set
    dvc_repo: str = ""
    dvc_rev: str = ""
    importer: str = "busi"
    work_dir: str | os.PathLike = ".m2snet/pipeline"  # kfp task outputs and the run's logs
    experiment: str = PIPELINE_EXPERIMENT
    model_name: str = DEFAULT_MODEL_NAME
    n_folds: int | None = None
    n_trials: int = -1  # -1: the preset's
    seed: int = 42
    train_overrides: Mapping[str, Any] = field(default_factory=dict)  # TrainConfig fields (--set)
    tuning_storage: str = ""
    seeds: str = ""  # repeat the CV once per training seed on one split ("42,43"; "": the config's one seed)
    floor: float | None = None  # the promotion gate (None: the preset's)
    margin: float | None = None
    noskill_margin: float | None = None
    require_ci: bool | None = None  # the statistical gate: a paired 95 % CI above production's
    metric_protocol: str = DEFAULT_PROTOCOL
    threads: int | None = None  # torch threads per task (None: half the cores; two fold tasks run at once)
    display: str = "plain"  # live | plain | stream | auto (see RunView)
    runner: str = "subprocess"  # subprocess | container
    # A fixed-split protocol (polyp | polyp-video | covid | oct): its pipeline (pipelines/protocol.py) runs
    # instead of the CV pipeline; n_folds, n_trials and tuning_storage do not apply to it.
    fixed_split: str = ""
    split_options: Mapping[str, Any] = field(default_factory=dict)  # make_fixed_split arguments (e.g. tests)
    # The runner's task outputs (<work_dir>/kfp/<run>/: data copies, fold checkpoints, reports) are removed
    # after a successful run unless kept; a failed or interrupted run keeps them for a look.
    keep_intermediates: bool = False

    @classmethod
    def for_protocol(cls, protocol: str, **fields: Any) -> "LocalRunOptions":
        """A fixed-split protocol's run, with its defaults: its preset, first source format, experiment and
        model name (``m2snet-<protocol>``); ``fields`` override them."""
        from m2snet.kubeflow.pipelines.protocol import DEFAULT_PROTOCOL_EXPERIMENT
        from m2snet.workflows.protocols import get_protocol, registered_model_name

        p = get_protocol(protocol)
        if p.kfold:
            raise M2SNetError(f"protocol {protocol!r} is k-fold CV: "
                              f"run `m2snet pipeline run --local --preset {protocol}`")
        defaults = dict(preset=protocol, importer=p.formats[0], experiment=DEFAULT_PROTOCOL_EXPERIMENT,
                        model_name=registered_model_name(protocol))
        return cls(**{**defaults, **fields, "fixed_split": protocol})

    def arguments(self) -> dict[str, Any]:
        """The pipeline's arguments: the preset's defaults where a field is None."""
        p = get_preset(self.preset)
        common = dict(
            preset=self.preset, data_path=self.data_path, dvc_repo=self.dvc_repo, dvc_rev=self.dvc_rev,
            importer=self.importer, seed=self.seed, train_overrides=json.dumps(dict(self.train_overrides)),
            experiment=self.experiment, model_name=self.model_name,
            promote_floor=p.promotion.floor if self.floor is None else self.floor,
            promote_margin=p.promotion.margin if self.margin is None else self.margin,
            promote_noskill_margin=p.promotion.noskill_margin if self.noskill_margin is None else self.noskill_margin,
            metric_protocol=check_protocol(self.metric_protocol),
        )
        if self.fixed_split:
            return dict(common, protocol=self.fixed_split, split_options=json.dumps(dict(self.split_options)))
        return dict(common, n_folds=self.n_folds or p.n_folds, n_trials=self.n_trials,
                    tuning_storage=self.tuning_storage, seeds=",".join(map(str, parse_seeds(self.seeds))),
                    promote_require_ci=p.promotion.require_ci if self.require_ci is None else self.require_ci)

    def pipeline(self) -> "LocalPipeline":
        """The pipeline these options run, built for the local runner."""
        if self.fixed_split:  # one task at a time: it may use every core
            from m2snet.kubeflow.pipelines import protocol

            threads = self.threads or os.cpu_count() or 1
            return LocalPipeline(
                protocol.build_pipeline(cluster=False, local_threads=threads), loop_items=1,
                title=f"protocol {self.fixed_split} (fixed split), preset {self.preset}",
                tables=("test/test_sets.md", "report/paper_comparison.md"),
                table_title="Test sets (each with the no-skill predictor's row)")
        from m2snet.kubeflow.pipelines import busi_cv

        folds = self.n_folds or get_preset(self.preset).n_folds
        threads = self.threads or max(1, (os.cpu_count() or 2) // 2)  # two fold tasks run at once
        seeds = parse_seeds(self.seeds)
        return LocalPipeline(busi_cv.build_pipeline(cluster=False, local_threads=threads),
                             loop_items=loop_items(folds, self.seeds),
                             title=f"preset {self.preset}, {folds} folds"
                                   + (f" x {len(seeds)} seeds" if seeds else ""), tables=("cv/cv_table.md",),
                             table_title=LocalRunResult.table_title)


@dataclass(frozen=True)
class LocalPipeline:
    """A pipeline as the local run needs it: its function, its loop's size, what to show at the end."""

    function: Any  # the kfp pipeline function (build_pipeline(cluster=False))
    loop_items: int | list[str]  # items of its ParallelFor (the console lists a loop's tasks once per item)
    title: str  # the console's header
    tables: tuple[str, ...]  # the parent run's artifacts shown at the end: the table, then a comparison
    table_title: str


def _new_log_dir(logs: Path) -> Path:
    """This run's own log folder, ``<logs>/<time>-<pid>``, created here and nowhere else (``mkdir`` fails on
    one that exists): two runs in one work dir never share a folder, its task logs or its events file
    (which the console follows), however close together they start."""
    logs.mkdir(parents=True, exist_ok=True)
    stem = f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    for n in range(1000):  # the same process starting runs within one second (a script, a test)
        path = logs / (stem if n == 0 else f"{stem}-{n}")
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue
    raise M2SNetError(f"{logs}: could not create a new log folder {stem}-N")


def _local_tracking_uri() -> str:
    """``$MLFLOW_TRACKING_URI`` or the default SQLite store, made absolute (every task subprocess shares it)."""
    return absolute_sqlite_uri(os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI)


def run_local(options: LocalRunOptions) -> LocalRunResult:
    """Run the pipeline on the kfp local runner: ``options.runner`` "subprocess" (this Python environment)
    or "container" (every step in COMPONENT_IMAGE through docker/podman, see m2snet.kubeflow.container).

    The local runner executes the same components, ParallelFor fan-out, Collected fan-in and exit
    handler as a cluster (at most two loop iterations at once); GPU requests, limits, retries and
    Secrets are left out of the local variant. MLflow: ``$MLFLOW_TRACKING_URI`` or
    ``sqlite:///mlflow.db`` (made absolute, so every task subprocess writes to the same store).

    Console (``options.display``, see :class:`m2snet.kubeflow.runview.RunView`): ``"live"`` a live task
    table, ``"plain"`` a line per task start/end, ``"stream"`` everything the runner prints, ``"auto"``
    live on a terminal else plain. Every task's full output is in ``<work_dir>/logs/<time>-<pid>/<task>.log``.
    A failed task raises :class:`PipelineTaskFailed` naming it and its log, after the parent MLflow
    run was marked FAILED with the log's tail.
    """
    o = options
    if o.runner not in RUNNERS:
        raise M2SNetError(f"unknown runner {o.runner!r}; choose one of {list(RUNNERS)}")
    if o.importer not in list_importers():  # fail before starting anything
        raise M2SNetError(f"--importer {o.importer!r}: unknown layout; choose one of {list_importers()}")
    data_path = o.data_path
    if data_path and o.runner == "container":
        data_path = str(Path(data_path).resolve())  # mounted at the same path; the step's cwd is not ours
    arguments = replace(o, data_path=data_path).arguments()
    uri = _local_tracking_uri()
    # Every task subprocess, and the MLflow calls here, use the run's store; the caller's setting is back after.
    # MLflow's artifact download bars (the CV table, the registered model) would cut through the console.
    with environment(MLFLOW_TRACKING_URI=uri), environment_defaults(MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR="false"):
        return _run_and_collect(o, arguments, data_path=data_path, uri=uri)


def _run_and_collect(o: LocalRunOptions, arguments: dict[str, Any], *, data_path: str, uri: str) -> LocalRunResult:
    """The run itself, in the run's environment: its console and logs, then what it registered and decided."""
    pipeline = o.pipeline()
    work = Path(o.work_dir).resolve()
    view = RunView(_new_log_dir(work / "logs"), planned_tasks(pipeline.function, loop_items=pipeline.loop_items),
                   mode=o.display)
    root = work / "kfp" / view.log_dir.name  # this run's task outputs alone: removed after a success
    root.mkdir(parents=True)
    t0 = time.perf_counter()

    interruption = Interruption()  # replaced by the block's own; what a signal stopped
    try:
        with stop_children_on_signal() as interruption:
            task, failure = _run_pipeline(o, pipeline, arguments, view, data_path=data_path, uri=uri, root=root)
    except (KeyboardInterrupt, Terminated) as err:
        raise type(err)(_record_interruption(view, o.experiment, interruption, time.perf_counter() - t0)) from None
    seconds = time.perf_counter() - t0
    if failure is not None or view.failed:
        raise _record_failure(view, o.experiment, failure or RuntimeError("a task failed")) from failure
    result = _result(o, pipeline, task, view, uri=uri, root=root, seconds=seconds)
    if not o.keep_intermediates:
        # Everything a later step or a user needs is in MLflow (the checkpoints in the models, linked there
        # in a local store, the reports as artifacts); the task outputs were ~4 checkpoints' worth of disk.
        shutil.rmtree(root, ignore_errors=True)
        result.intermediates_removed = True
    return result


def _run_pipeline(o: LocalRunOptions, pipeline: LocalPipeline, arguments: dict[str, Any], view: RunView, *,
                  data_path: str, uri: str, root: Path) -> tuple[Any, Exception | None]:
    """The pipeline on the kfp local runner, its console and logs in ``view``: (its final task, a failure)."""
    from kfp import local

    task, failure = None, None
    with warnings.catch_warnings(), view, _kfp_runner(o.runner, data_path=data_path, tracking_uri=uri) as kfp_runner:
        view.header(f"m2snet pipeline: {pipeline.title}, MLflow {redact(uri)}, runner {o.runner}\n"
                    f"logs: {view.log_dir}/")
        log.info("local pipeline run: %s, MLflow %s, kfp root %s, runner %s", pipeline.title, redact(uri), root,
                 o.runner)
        # The SubprocessRunner warns that our image name has no "python" in it (we run in this env), and
        # that display names are not shown locally (the console shows them).
        warnings.filterwarnings("ignore", message=".*non-Python base image.*")
        warnings.filterwarnings("ignore", message=r".*\['display_name'\] have no effect in the current local runner.*")
        local.init(runner=kfp_runner, pipeline_root=str(root), raise_on_error=True)
        try:
            task = pipeline.function(**arguments)
        except RuntimeError as err:  # the local runner's "inner task failed"
            failure = err
            view.mark_skipped()
    return task, failure


def _result(o: LocalRunOptions, pipeline: LocalPipeline, task: Any, view: RunView, *, uri: str, root: Path,
            seconds: float) -> LocalRunResult:
    """What a finished local run registered and decided, read back from MLflow."""
    client = mlflow_client(uri)
    outputs = getattr(task, "outputs", {}) or {}
    version = outputs.get("Output") if isinstance(outputs, dict) else getattr(task, "output", "")
    version = str(version) if version else ""
    if not version and view.pipeline_run_id:
        mv = find_version_by_key(o.model_name, view.pipeline_run_id, client)
        version = str(mv.version) if mv is not None else ""
    if not version:
        raise M2SNetError(f"local pipeline run finished but registered no version of {o.model_name!r} "
                          f"(runner log: {view.main_log})")
    mv = client.get_model_version(o.model_name, version)
    pipeline_run_id = mv.tags.get("pipeline_run_id", "")
    parent = parent_run(pipeline_run_id, o.experiment, create=False)
    prod = version_by_alias(o.model_name, PRODUCTION, client)
    texts = []
    for artifact in pipeline.tables if parent is not None else ():
        with tempfile.TemporaryDirectory() as tmp:
            try:
                texts.append(Path(client.download_artifacts(parent.run_id, artifact, tmp)).read_text().strip())
            except Exception as err:  # noqa: BLE001 - the tables are a convenience here
                log.warning("could not read %s of run %s: %s", artifact, parent.run_id, err)
                texts.append("")
    table, comparison = (texts + ["", ""])[:2]
    exp = client.get_experiment_by_name(o.experiment)
    return LocalRunResult(
        model_name=o.model_name, version=version, pipeline_run_id=pipeline_run_id,
        parent_run_id=parent.run_id if parent else None,
        production_version=str(prod.version) if prod is not None else None,
        promoted=prod is not None and str(prod.version) == version, table=table, tracking_uri=redact(uri),
        pipeline_root=root, seconds=seconds, log_dir=view.log_dir,
        tasks=[TaskSummary(t.label, t.state, t.seconds, t.log) for t in view.tasks.values()],
        promotion=mv.tags.get("promotion_decision", ""), experiment_id=exp.experiment_id if exp else "",
        notes=list(view.notes), table_title=pipeline.table_title, comparison=comparison,
    )
