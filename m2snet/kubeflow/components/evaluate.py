from kfp import dsl
from kfp.dsl import Dataset, Input, Metrics, Model, Output

from m2snet.kubeflow.image import COMPONENT_IMAGE


@dsl.component(base_image=COMPONENT_IMAGE, install_kfp_package=False)
def evaluate_fold(
    dataset: Input[Dataset],
    split: Input[Dataset],
    model: Input[Model],
    fold: int,
    report: Output[Dataset],
    metrics: Output[Metrics],
    metric_protocol: str,  # no default here: kfp ships this source alone; the pipeline passes it
    seed: int = -1,  # steps.NO_SEED; only names the task for the local console
):
    """Score the fold's checkpoint and the no-skill predictor on its validation cases at original size
    (per-case CSV + overlays) under the metric protocol."""
    from m2snet.progress import task_started
    from m2snet.redaction import install_redaction
    from m2snet.workflows import steps

    install_redaction()  # every line this task logs, as in the CLI: no credential in a pod log
    task_started("evaluate-fold", steps.loop_item(fold, seed))  # for the local console; no-op on a cluster

    scores = steps.evaluate_fold_step(dataset.path, split.path, fold, model.path, report.path,
                                      metric_protocol=metric_protocol)
    for key, value in scores.items():
        metrics.log_metric(key, value)
