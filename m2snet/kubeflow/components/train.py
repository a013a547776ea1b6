from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Metrics, Model, Output

from m2snet.kubeflow.image import COMPONENT_IMAGE


@dsl.component(base_image=COMPONENT_IMAGE, install_kfp_package=False)
def train_fold(
    dataset: Input[Dataset],
    split: Input[Dataset],
    best_params: Input[Artifact],
    fold: int,
    seed: int,
    model: Output[Model],
    metrics: Output[Metrics],
    preset: str,
    train_overrides: str = "{}",
    seeds: str = "",  # the pipeline's seeds: with several, the seed names the task's runs
    pipeline_run_id: str = "",
    experiment: str = "",
):
    """Train one CV fold (a child MLflow run of the pipeline's parent run); output its checkpoint."""
    from m2snet.progress import task_started
    from m2snet.redaction import install_redaction
    from m2snet.workflows import steps

    # For the local console (a no-op on a cluster): "train-fold-2", or "train-fold-2-seed43" when seeds repeat.
    install_redaction()  # every line this task logs, as in the CLI: no credential in a pod log
    task_started("train-fold", steps.loop_item(fold, seed), pipeline_run_id=pipeline_run_id)

    result = steps.train_fold_step(
        dataset.path, split.path, fold, best_params.path, model.path, preset=preset,
        train_overrides=train_overrides, seed=seed, seeds=seeds,
        ctx=steps.RunContext.for_pipeline(pipeline_run_id, experiment),
    )
    model.metadata.update(result["model_metadata"])
    for key, value in result["metrics"].items():
        metrics.log_metric(key, value)
