from typing import List

from kfp import dsl
from kfp.dsl import Dataset, Input, Output

from m2snet.kubeflow.image import COMPONENT_IMAGE


@dsl.component(base_image=COMPONENT_IMAGE, install_kfp_package=False)
def split_dataset(dataset: Input[Dataset], split: Output[Dataset], n_folds: int, seed: int,
                  pipeline_run_id: str = "", experiment: str = "") -> List[int]:
    """Write the stratified, duplicate-grouped K-fold split file (its hash goes on the pipeline's run);
    return the fold indices to fan out over."""
    from m2snet.progress import task_started
    from m2snet.workflows import steps

    task_started("split-dataset", pipeline_run_id=pipeline_run_id)  # for the local console; no-op on a cluster

    return steps.split_dataset(dataset.path, split.path, n_folds=n_folds, seed=seed,
                               pipeline_run_id=pipeline_run_id, experiment=experiment)
