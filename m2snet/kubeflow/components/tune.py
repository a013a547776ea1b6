from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Output

from m2snet.kubeflow.image import COMPONENT_IMAGE


@dsl.component(base_image=COMPONENT_IMAGE, install_kfp_package=False)
def tune_hyperparameters(
    dataset: Input[Dataset],
    split: Input[Dataset],
    best_params: Output[Artifact],
    preset: str,
    fold: int = 0,
    seed: int = -1,  # steps.NO_SEED: the training config's own
    seeds: str = "",  # the pipeline's seeds: with several, the seed names the task's runs
    train_overrides: str = "{}",
    n_trials: int = -1,
    storage: str = "",
    pipeline_run_id: str = "",
    experiment: str = "",
) -> str:
    """Nested tuning: an Optuna study on an inner split of fold ``fold``'s training cases; best params as JSON."""
    from m2snet.progress import task_started
    from m2snet.redaction import install_redaction
    from m2snet.workflows import steps

    # For the local console (a no-op on a cluster): "...-2", or "...-2-seed43" when seeds repeat.
    install_redaction()  # every line this task logs, as in the CLI: no credential in a pod log
    task_started("tune-hyperparameters", steps.loop_item(fold, seed), pipeline_run_id=pipeline_run_id)

    return steps.tune_step(
        dataset.path, split.path, best_params.path, preset=preset, train_overrides=train_overrides,
        n_trials=n_trials, storage=storage, task={"fold": fold, "seed": seed, "seeds": seeds},
        ctx=steps.RunContext.for_pipeline(pipeline_run_id, experiment),
    )
