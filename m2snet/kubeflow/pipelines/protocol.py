"""The fixed-split pipeline: one of the paper's protocols (polyp, polyp-video, covid, oct) end to end.

    DVC data / path / demo -> prepare (import + validate) -> split (the protocol's fixed split)
      -> train (training set; validation set scored per epoch) -> evaluate every test set (+ no skill)
      -> register (model ``m2snet-<protocol>``) -> promote
    exit handler (always): finalize -> the parent MLflow run FINISHED (its description: the test-set
    table and the paper's figures beside ours), or FAILED with why

The CV protocol (busi) is the CV pipeline (busi_cv.py). ``build_pipeline(cluster=True)`` is compiled to
``protocol.yaml`` (GPU training, limits, retries, Secrets, as busi_cv.yaml); ``cluster=False`` is the
same graph for the kfp local runner (:func:`run_local`, ``m2snet pipeline run --local --protocol NAME``).

Recompile after any change here or in its components:  m2snet pipeline compile
"""

# No `from __future__ import annotations`: kfp reads the pipeline signature's real types.

import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from kfp import dsl

from m2snet.common import M2SNetError, redact
from m2snet.evaluation.metrics import DEFAULT_PROTOCOL, check_protocol
from m2snet.kubeflow.components import prepare_dataset, promote_model
from m2snet.kubeflow.components.protocol import (
    evaluate_test_sets,
    finalize_protocol,
    register_protocol,
    split_protocol,
    train_protocol,
)
from m2snet.kubeflow.pipelines.busi_cv import configure_task, request_training_resources
from m2snet.workflows.presets import get_preset
from m2snet.workflows.protocols import get_protocol, registered_model_name

PIPELINE_NAME = "m2snet-protocol"
CLUSTER_PROTOCOL = "polyp"  # the compiled pipeline's default protocol (and preset)
DEFAULT_PROTOCOL_EXPERIMENT = "m2snet-protocols"
COMPILED = Path(__file__).with_suffix(".yaml")


def build_pipeline(cluster: bool = True, local_threads: int = 1):
    """The pipeline function; ``cluster`` adds GPU requests, limits, retries and Secrets."""
    policy = get_preset(CLUSTER_PROTOCOL).promotion

    def prepare(task: dsl.PipelineTask, display_name: str) -> dsl.PipelineTask:
        return configure_task(task, display_name, cluster=cluster, local_threads=local_threads)

    @dsl.pipeline(name=PIPELINE_NAME, description=__doc__.strip().splitlines()[0])
    def protocol_pipeline(
        protocol: str = CLUSTER_PROTOCOL,  # polyp | polyp-video | covid | oct
        preset: str = CLUSTER_PROTOCOL,  # the training recipe (m2snet.workflows.presets)
        data_path: str = "",
        dvc_repo: str = "",
        dvc_rev: str = "",
        dvc_path: str = "data/polyp",
        importer: str = "pranet",  # the raw layout of data_path / the DVC path (m2snet-format data needs none)
        seed: int = 42,
        # JSON of make_fixed_split arguments replacing the protocol's split, e.g. Inf-Net's COVID list:
        # {"tests": {"COVID": "ids:/data/infnet-test.txt"}}
        split_options: str = "{}",
        train_overrides: str = "{}",
        experiment: str = DEFAULT_PROTOCOL_EXPERIMENT,
        model_name: str = "",  # "" = m2snet-<protocol>
        promote_floor: float = policy.floor,
        promote_margin: float = policy.margin,
        promote_noskill_margin: float = policy.noskill_margin,
        metric_protocol: str = DEFAULT_PROTOCOL,
    ) -> str:
        run_id = dsl.PIPELINE_JOB_ID_PLACEHOLDER
        finalize = prepare(finalize_protocol(pipeline_run_id=run_id, experiment=experiment), "finalize")
        with dsl.ExitHandler(finalize, name="protocol-pipeline"):
            data = prepare(prepare_dataset(
                preset=preset, data_path=data_path, dvc_repo=dvc_repo, dvc_rev=dvc_rev, dvc_path=dvc_path,
                importer=importer, pipeline_run_id=run_id, experiment=experiment,
            ), "prepare + validate")
            split = prepare(split_protocol(dataset=data.outputs["dataset"], protocol=protocol, seed=seed,
                                           split_options=split_options, pipeline_run_id=run_id,
                                           experiment=experiment), "split")
            train = prepare(train_protocol(
                dataset=data.outputs["dataset"], split=split.outputs["split"], protocol=protocol, preset=preset,
                train_overrides=train_overrides, pipeline_run_id=run_id, experiment=experiment,
            ), "train")
            if cluster:
                request_training_resources(train)
            evaluation = prepare(evaluate_test_sets(
                dataset=data.outputs["dataset"], split=split.outputs["split"], model=train.outputs["model"],
                protocol=protocol, metric_protocol=metric_protocol, pipeline_run_id=run_id, experiment=experiment,
            ), "evaluate test sets")
            registered = prepare(register_protocol(
                model=train.outputs["model"], report=evaluation.outputs["report"], split=split.outputs["split"],
                protocol=protocol, model_name=model_name, dataset_version=data.outputs["Output"],
                metric_protocol=metric_protocol, pipeline_run_id=run_id, experiment=experiment,
            ), "register")
            prepare(promote_model(
                model_name=registered.outputs["model_name"], version=registered.outputs["version"],
                floor=promote_floor, margin=promote_margin, noskill_margin=promote_noskill_margin,
                pipeline_run_id=run_id, experiment=experiment,
            ), "promote")
        return finalize.output

    return protocol_pipeline


protocol_pipeline = build_pipeline(cluster=True)


def compile_pipeline(out: str | os.PathLike | None = None) -> Path:
    """Compile the cluster variant to YAML (default: the packaged ``protocol.yaml``)."""
    from kfp import compiler

    out = Path(out) if out else COMPILED
    compiler.Compiler().compile(build_pipeline(cluster=True), str(out))
    return out


def check_compiled() -> str:
    """Raise if the committed ``protocol.yaml`` differs from a fresh compile; else say so."""
    with tempfile.TemporaryDirectory() as tmp:
        fresh = compile_pipeline(Path(tmp) / COMPILED.name).read_text()
    if not COMPILED.is_file() or COMPILED.read_text() != fresh:
        raise M2SNetError(f"{COMPILED}: stale; run `m2snet pipeline compile` and commit the result")
    return f"{COMPILED}: up to date"


@dataclass
class ProtocolRunResult:
    protocol: str
    model_name: str
    version: str
    promoted: bool
    promotion: str  # the decision and its reason
    parent_run_id: str | None
    table: str  # test_sets.md: one row per test set + mean, each with its no-skill row
    comparison: str  # paper_comparison.md
    metrics: dict[str, float]  # the parent run's metrics (<set>_<metric>, <set>_noskill_<metric>, mean_...)
    tracking_uri: str
    seconds: float


def run_local(
    protocol: str,
    *,
    preset: str | None = None,
    data_path: str = "",
    importer: str | None = None,
    work_dir: str | os.PathLike = ".m2snet/pipeline",
    experiment: str = DEFAULT_PROTOCOL_EXPERIMENT,
    model_name: str = "",
    seed: int = 42,
    split_options: Mapping[str, Any] | None = None,
    train_overrides: Mapping[str, Any] | None = None,
    floor: float | None = None,
    margin: float | None = None,
    noskill_margin: float | None = None,
    metric_protocol: str = DEFAULT_PROTOCOL,
    threads: int = 1,
) -> ProtocolRunResult:
    """Run the protocol pipeline on the kfp local runner (subprocesses in this environment; the runner's
    output streams to the console). ``preset`` defaults to the protocol's, ``importer`` to its first
    source format. MLflow: ``$MLFLOW_TRACKING_URI`` or ``sqlite:///mlflow.db`` (made absolute)."""
    from kfp import local

    from m2snet.mlops.tracking import DEFAULT_TRACKING_URI, mlflow_client, parent_run

    p = get_protocol(protocol)
    if p.kfold:
        raise M2SNetError(f"protocol {protocol!r} is k-fold CV: run `m2snet pipeline run --local --preset {protocol}`")
    preset = preset or protocol
    pol = get_preset(preset).promotion
    uri = os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):  # every task subprocess: one store
        uri = "sqlite:///" + str(Path(uri.removeprefix("sqlite:///")).resolve())
    os.environ["MLFLOW_TRACKING_URI"] = uri
    root = Path(work_dir).resolve() / "kfp"
    root.mkdir(parents=True, exist_ok=True)
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(root), raise_on_error=True)
    t0 = time.perf_counter()
    try:
        task = build_pipeline(cluster=False, local_threads=threads)(
            protocol=protocol, preset=preset, data_path=data_path, importer=importer or p.formats[0], seed=seed,
            split_options=json.dumps(dict(split_options or {})),
            train_overrides=json.dumps(dict(train_overrides or {})), experiment=experiment, model_name=model_name,
            promote_floor=pol.floor if floor is None else floor,
            promote_margin=pol.margin if margin is None else margin,
            promote_noskill_margin=pol.noskill_margin if noskill_margin is None else noskill_margin,
            metric_protocol=check_protocol(metric_protocol),
        )
    except RuntimeError as err:  # the local runner's "inner task failed"; the exit handler closed the MLflow run
        raise M2SNetError(f"protocol pipeline {protocol} failed: {err} (the task's output is above; task "
                          f"files under {root})") from err
    seconds = time.perf_counter() - t0
    name = model_name or registered_model_name(protocol)
    client = mlflow_client(uri)
    version = str(task.outputs.get("Output") or "")
    if not version:
        raise M2SNetError(f"protocol pipeline {protocol} finished but registered no version of {name!r}")
    mv = client.get_model_version(name, version)
    parent = parent_run(mv.tags.get("pipeline_run_id", ""), experiment, create=False)
    texts = {}
    with tempfile.TemporaryDirectory() as tmp:
        for artifact in ("test/test_sets.md", "report/paper_comparison.md"):
            texts[artifact] = Path(client.download_artifacts(parent.run_id, artifact, tmp)).read_text().strip() \
                if parent is not None else ""
    decision = mv.tags.get("promotion_decision", "")
    return ProtocolRunResult(
        protocol=protocol, model_name=name, version=version, promoted=decision.startswith("promoted"),
        promotion=decision, parent_run_id=parent.run_id if parent else None, table=texts["test/test_sets.md"],
        comparison=texts["report/paper_comparison.md"],
        metrics=dict(client.get_run(parent.run_id).data.metrics) if parent else {},
        tracking_uri=redact(uri), seconds=seconds,
    )
