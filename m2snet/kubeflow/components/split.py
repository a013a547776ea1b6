from typing import Dict, List

from kfp import dsl
from kfp.dsl import Dataset, Input, Output

from m2snet.kubeflow.image import COMPONENT_IMAGE


@dsl.component(base_image=COMPONENT_IMAGE, install_kfp_package=False)
def split_dataset(dataset: Input[Dataset], split: Output[Dataset], n_folds: int, seed: int, seeds: str = "",
                  pipeline_run_id: str = "", experiment: str = "") -> List[Dict[str, int]]:
    """Write the stratified, duplicate-grouped K-fold split file (its hash goes on the pipeline's run);
    return the fold tasks to fan out over: {"fold", "seed"} per training seed of ``seeds`` and fold."""
    from m2snet.progress import task_started
    from m2snet.redaction import install_redaction
    from m2snet.workflows import steps

    install_redaction()  # every line this task logs, as in the CLI: no credential in a pod log
    task_started("split-dataset", pipeline_run_id=pipeline_run_id)  # for the local console; no-op on a cluster

    return steps.split_dataset(dataset.path, split.path, n_folds=n_folds, seed=seed, seeds=seeds,
                               ctx=steps.RunContext.for_pipeline(pipeline_run_id, experiment))
