from typing import List

from kfp import dsl
from kfp.dsl import Dataset, Input, Metrics, Model

from m2snet.kubeflow.image import COMPONENT_IMAGE


@dsl.component(base_image=COMPONENT_IMAGE, install_kfp_package=False)
def register_model(
    models: Input[List[Model]],
    cv_metrics: Input[Metrics],
    split: Input[Dataset],
    dataset: Input[Dataset],
    model_name: str,
    dataset_version: str,
    metric_protocol: str,  # no default here: kfp ships this source alone; the pipeline passes it
    pipeline_run_id: str = "",
    experiment: str = "",
) -> str:
    """Register the folds as ONE model version (ensemble pyfunc) with its input guard fitted on ``dataset``;
    idempotent per pipeline run."""
    from m2snet.progress import task_started
    from m2snet.redaction import install_redaction
    from m2snet.workflows import steps

    install_redaction()  # every line this task logs, as in the CLI: no credential in a pod log
    task_started("register-model", pipeline_run_id=pipeline_run_id)  # for the local console; no-op on a cluster

    return steps.register_step(
        [m.path for m in models], dict(cv_metrics.metadata), split.path, model_name=model_name,
        dataset_version=dataset_version, ctx=steps.RunContext.for_pipeline(pipeline_run_id, experiment),
        metric_protocol=metric_protocol, data=dataset.path,
    )
