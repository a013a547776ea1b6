"""The fixed-split pipeline's own components (m2snet.kubeflow.pipelines.protocol).

Each body calls ONE function of :mod:`m2snet.workflows.protocols` (its "pipeline steps" section), as the
CV pipeline's components call :mod:`m2snet.workflows.steps`; prepare and promote are the CV pipeline's.
"""

from typing import List, NamedTuple

from kfp import dsl
from kfp.dsl import Dataset, Input, Metrics, Model, Output

from m2snet.kubeflow.image import COMPONENT_IMAGE


@dsl.component(base_image=COMPONENT_IMAGE, install_kfp_package=False)
def split_protocol(dataset: Input[Dataset], split: Output[Dataset], protocol: str, seed: int,
                   split_options: str = "{}", pipeline_run_id: str = "", experiment: str = "") -> List[str]:
    """The protocol's fixed split (training, validation and named test sets); return the test sets' names."""
    from m2snet.progress import task_started
    from m2snet.redaction import install_redaction
    from m2snet.workflows import protocols

    install_redaction()  # every line this task logs, as in the CLI: no credential in a pod log
    task_started("split-protocol", pipeline_run_id=pipeline_run_id)  # for the local console; no-op on a cluster
    return protocols.split_step(dataset.path, split.path, protocol=protocol, seed=seed, split_options=split_options,
                                ctx=protocols.RunContext.for_pipeline(pipeline_run_id, experiment))


@dsl.component(base_image=COMPONENT_IMAGE, install_kfp_package=False)
def train_protocol(
    dataset: Input[Dataset],
    split: Input[Dataset],
    model: Output[Model],
    metrics: Output[Metrics],
    protocol: str,
    preset: str,
    train_overrides: str = "{}",
    pipeline_run_id: str = "",
    experiment: str = "",
):
    """Train on the split's training set with the preset's recipe and the protocol's; output the checkpoint."""
    from m2snet.progress import task_started
    from m2snet.redaction import install_redaction
    from m2snet.workflows import protocols

    install_redaction()  # every line this task logs, as in the CLI: no credential in a pod log
    task_started("train-protocol", pipeline_run_id=pipeline_run_id)  # for the local console; no-op on a cluster
    result = protocols.train_step(dataset.path, split.path, model.path, protocol=protocol, preset=preset,
                                  train_overrides=train_overrides,
                                  ctx=protocols.RunContext.for_pipeline(pipeline_run_id, experiment))
    model.metadata.update(result["model_metadata"])
    for key, value in result["metrics"].items():
        metrics.log_metric(key, value)


@dsl.component(base_image=COMPONENT_IMAGE, install_kfp_package=False)
def evaluate_test_sets(
    dataset: Input[Dataset],
    split: Input[Dataset],
    model: Input[Model],
    report: Output[Dataset],
    metrics: Output[Metrics],
    protocol: str,
    metric_protocol: str,  # no default here: kfp ships this source alone; the pipeline passes it
    pipeline_run_id: str = "",
    experiment: str = "",
):
    """One row per test set (+ the mean), each with the no-skill predictor's row, and the paper's figures."""
    from m2snet.progress import task_started
    from m2snet.redaction import install_redaction
    from m2snet.workflows import protocols

    install_redaction()  # every line this task logs, as in the CLI: no credential in a pod log
    task_started("evaluate-test-sets", pipeline_run_id=pipeline_run_id)  # for the local console; no-op on a cluster
    scores = protocols.evaluate_step(dataset.path, split.path, model.path, report.path, protocol=protocol,
                                     metric_protocol=metric_protocol,
                                     ctx=protocols.RunContext.for_pipeline(pipeline_run_id, experiment))
    for key, value in scores.items():
        metrics.log_metric(key, value)


@dsl.component(base_image=COMPONENT_IMAGE, install_kfp_package=False)
def register_protocol(
    model: Input[Model],
    report: Input[Dataset],
    split: Input[Dataset],
    protocol: str,
    model_name: str,
    dataset_version: str,
    metric_protocol: str,  # no default here: kfp ships this source alone; the pipeline passes it
    pipeline_run_id: str = "",
    experiment: str = "",
) -> NamedTuple("Registered", model_name=str, version=str):
    """Register the model as one version of ``model_name`` (default ``m2snet-<protocol>``); idempotent per run."""
    from m2snet.progress import task_started
    from m2snet.redaction import install_redaction
    from m2snet.workflows import protocols

    install_redaction()  # every line this task logs, as in the CLI: no credential in a pod log
    task_started("register-protocol", pipeline_run_id=pipeline_run_id)  # for the local console; no-op on a cluster
    return protocols.register_protocol_step(model.path, report.path, split.path, protocol=protocol,
                                            model_name=model_name, dataset_version=dataset_version,
                                            metric_protocol=metric_protocol,
                                            ctx=protocols.RunContext.for_pipeline(pipeline_run_id, experiment))


@dsl.component(base_image=COMPONENT_IMAGE, install_kfp_package=False)
def finalize_protocol(status: dsl.PipelineTaskFinalStatus, pipeline_run_id: str = "", experiment: str = "") -> str:
    """Exit handler: close the parent MLflow run (its test-set table stays its description); return the version."""
    from m2snet.progress import task_started
    from m2snet.redaction import install_redaction
    from m2snet.workflows import protocols

    install_redaction()  # every line this task logs, as in the CLI: no credential in a pod log
    task_started("finalize-protocol", pipeline_run_id=pipeline_run_id)  # for the local console; no-op on a cluster
    return protocols.finalize_protocol_step(status.state, status.error_message or "",
                                            ctx=protocols.RunContext.for_pipeline(pipeline_run_id, experiment))


__all__ = ["split_protocol", "train_protocol", "evaluate_test_sets", "register_protocol", "finalize_protocol"]
