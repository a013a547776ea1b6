from typing import List

from kfp import dsl
from kfp.dsl import Dataset, Input, Metrics, Output

from m2snet.kubeflow.image import COMPONENT_IMAGE


@dsl.component(base_image=COMPONENT_IMAGE, install_kfp_package=False)
def aggregate_cv(
    fold_metrics: Input[List[Metrics]],
    fold_reports: Input[List[Dataset]],
    cv_table: Output[Dataset],
    cv_metrics: Output[Metrics],
    metric_protocol: str,  # no default here: kfp ships this source alone; the pipeline passes it
    pipeline_run_id: str = "",
    experiment: str = "",
):
    """The CV table (mean +- std over folds, in percent; model and no-skill rows) and the per-case scores,
    logged on the parent run."""
    from m2snet.progress import task_started
    from m2snet.redaction import install_redaction
    from m2snet.workflows import steps

    install_redaction()  # every line this task logs, as in the CLI: no credential in a pod log
    task_started("aggregate-cv", pipeline_run_id=pipeline_run_id)  # for the local console; no-op on a cluster

    summary = steps.aggregate_step(
        [m.metadata for m in fold_metrics], cv_table.path, report_dirs=[r.path for r in fold_reports],
        ctx=steps.RunContext.for_pipeline(pipeline_run_id, experiment), metric_protocol=metric_protocol,
    )
    for key, value in summary.items():
        cv_metrics.log_metric(key, value)
