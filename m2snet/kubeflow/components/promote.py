from kfp import dsl

from m2snet.kubeflow.image import COMPONENT_IMAGE


@dsl.component(base_image=COMPONENT_IMAGE, install_kfp_package=False)
def promote_model(
    model_name: str, version: str, floor: float, margin: float, noskill_margin: float, require_ci: bool = False,
    pipeline_run_id: str = "", experiment: str = "",
) -> bool:
    """Move alias `production` to the version if its CV Dice passes the floor, beats the no-skill predictor
    by ``noskill_margin`` and beats production by the margin (``require_ci``: by a paired 95 % CI above zero
    when the two are comparable, else by the margin, the reason saying so)."""
    from m2snet.progress import task_started
    from m2snet.redaction import install_redaction
    from m2snet.workflows import steps

    install_redaction()  # every line this task logs, as in the CLI: no credential in a pod log
    task_started("promote-model", pipeline_run_id=pipeline_run_id)  # for the local console; no-op on a cluster

    return steps.promote_step(model_name, version, floor=floor, margin=margin, noskill_margin=noskill_margin,
                              require_ci=require_ci, ctx=steps.RunContext.for_pipeline(pipeline_run_id, experiment))
