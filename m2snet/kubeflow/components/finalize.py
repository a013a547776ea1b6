from kfp import dsl

from m2snet.kubeflow.image import COMPONENT_IMAGE


@dsl.component(base_image=COMPONENT_IMAGE, install_kfp_package=False)
def finalize_run(status: dsl.PipelineTaskFinalStatus, pipeline_run_id: str = "", experiment: str = "") -> str:
    """Exit handler: close the parent MLflow run (FINISHED with its CV table, or FAILED and why); return the version."""
    from m2snet.progress import task_started
    from m2snet.redaction import install_redaction
    from m2snet.workflows import steps

    install_redaction()  # every line this task logs, as in the CLI: no credential in a pod log
    task_started("finalize-run", pipeline_run_id=pipeline_run_id)  # for the local console; no-op on a cluster

    return steps.finalize_step(status.state, status.error_message or "",
                               ctx=steps.RunContext.for_pipeline(pipeline_run_id, experiment))
