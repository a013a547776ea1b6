from kfp import dsl
from kfp.dsl import Dataset, Output

from m2snet.kubeflow.image import COMPONENT_IMAGE


@dsl.component(base_image=COMPONENT_IMAGE, install_kfp_package=False)
def prepare_dataset(
    dataset: Output[Dataset],
    preset: str,
    data_path: str = "",
    dvc_repo: str = "",
    dvc_rev: str = "",
    dvc_path: str = "data/busi",
    importer: str = "busi",
    pipeline_run_id: str = "",
    experiment: str = "",
) -> str:
    """Fetch (DVC revision / path / demo set), import a raw layout with ``importer``, validate; return the version."""
    from m2snet.progress import task_started
    from m2snet.redaction import install_redaction
    from m2snet.workflows import steps

    install_redaction()  # every line this task logs, as in the CLI: no credential in a pod log
    task_started("prepare-dataset", pipeline_run_id=pipeline_run_id)  # for the local console; no-op on a cluster

    return steps.prepare_dataset(
        dataset.path, preset=preset, data_path=data_path, dvc_repo=dvc_repo, dvc_rev=dvc_rev,
        dvc_path=dvc_path, importer=importer, ctx=steps.RunContext.for_pipeline(pipeline_run_id, experiment),
    )
