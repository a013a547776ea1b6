"""The fixed-split pipeline: one of the paper's protocols (polyp, polyp-video, covid, oct) end to end.

    DVC data / path / demo -> prepare (import + validate) -> split (the protocol's fixed split)
      -> train (training set; validation set scored per epoch) -> evaluate every test set (+ no skill)
      -> register (model ``m2snet-<protocol>``) -> promote
    exit handler (always): finalize -> the parent MLflow run FINISHED (its description: the test-set
    table and the paper's figures beside ours), or FAILED with why

The CV protocol (busi) is the CV pipeline (busi_cv.py). ``build_pipeline(cluster=True)`` is compiled to
``protocol.yaml`` (GPU training, limits, retries, Secrets, as busi_cv.yaml); ``cluster=False`` is the
same graph for the kfp local runner (``m2snet pipeline run --local --protocol NAME``: runner.run_local with
``LocalRunOptions.for_protocol``).

Recompile after any change here or in its components:  m2snet pipeline compile
"""

# No `from __future__ import annotations`: kfp reads the pipeline signature's real types.

import os
import tempfile
from pathlib import Path

from kfp import dsl

from m2snet.errors import M2SNetError
from m2snet.evaluation.metrics import DEFAULT_PROTOCOL
from m2snet.kubeflow.components import promote_model
from m2snet.kubeflow.components.protocol import (
    evaluate_test_sets,
    finalize_protocol,
    register_protocol,
    split_protocol,
    train_protocol,
)
from m2snet.kubeflow.pipelines.tasks import PipelineTasks
from m2snet.workflows.presets import get_preset

PIPELINE_NAME = "m2snet-protocol"
CLUSTER_PROTOCOL = "polyp"  # the compiled pipeline's default protocol (and preset)
DEFAULT_PROTOCOL_EXPERIMENT = "m2snet-protocols"
COMPILED = Path(__file__).with_suffix(".yaml")


def build_pipeline(cluster: bool = True, local_threads: int = 1):
    """The pipeline function; ``cluster`` adds GPU requests, limits, retries and Secrets."""
    policy = get_preset(CLUSTER_PROTOCOL).promotion

    step = PipelineTasks(cluster, local_threads)

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
        source = dict(preset=preset, data_path=data_path, dvc_repo=dvc_repo, dvc_rev=dvc_rev, dvc_path=dvc_path,
                      importer=importer)
        with step.guarded_run(finalize_protocol, "protocol-pipeline", run_id=run_id, experiment=experiment,
                              source=source) as (finalize, data):
            split = step(split_protocol(dataset=data.outputs["dataset"], protocol=protocol, seed=seed,
                                        split_options=split_options, pipeline_run_id=run_id,
                                        experiment=experiment), "split")
            train = step.training(train_protocol(
                dataset=data.outputs["dataset"], split=split.outputs["split"], protocol=protocol, preset=preset,
                train_overrides=train_overrides, pipeline_run_id=run_id, experiment=experiment,
            ), "train")
            evaluation = step(evaluate_test_sets(
                dataset=data.outputs["dataset"], split=split.outputs["split"], model=train.outputs["model"],
                protocol=protocol, metric_protocol=metric_protocol, pipeline_run_id=run_id, experiment=experiment,
            ), "evaluate test sets")
            registered = step(register_protocol(
                model=train.outputs["model"], report=evaluation.outputs["report"], split=split.outputs["split"],
                protocol=protocol, model_name=model_name, dataset_version=data.outputs["Output"],
                metric_protocol=metric_protocol, pipeline_run_id=run_id, experiment=experiment,
            ), "register")
            step(promote_model(
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
