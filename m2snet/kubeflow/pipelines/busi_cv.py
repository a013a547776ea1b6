"""The BUSI-style cross-validation pipeline.

    DVC data / path / demo -> prepare (import + validate) -> split
      -> ParallelFor (seed, fold): tune (Optuna, on the fold's inner split) -> train -> evaluate
      -> Collected: aggregate (CV table, per-case scores) -> register -> promote (margin or paired-CI gate)
    exit handler (always): finalize -> the parent MLflow run FINISHED with its CV table, or FAILED with why

``build_pipeline(cluster=True)`` is what gets compiled to ``busi_cv.yaml`` (and submitted): the
training tasks request one NVIDIA GPU, CPU/memory limits, retries and read the MLflow/S3
credentials from Kubernetes Secrets. ``build_pipeline(cluster=False)`` is the same graph from
the same components for the kfp local runner, which ignores (and warns about) those settings.

Recompile after any change here or in m2snet/kubeflow/components/:  m2snet pipeline compile
"""

# No `from __future__ import annotations`: kfp reads the pipeline signature's real types.

from pathlib import Path

from kfp import dsl

from m2snet.evaluation.metrics import DEFAULT_PROTOCOL
from m2snet.kubeflow.components import (
    aggregate_cv,
    evaluate_fold,
    finalize_run,
    promote_model,
    register_model,
    split_dataset,
    train_fold,
    tune_hyperparameters,
)
from m2snet.kubeflow.pipelines.tasks import PipelineTasks
from m2snet.mlops.mlflow_store import PIPELINE_EXPERIMENT
from m2snet.workflows.presets import DEFAULT_MODEL_NAME, PRESETS

PIPELINE_NAME = "m2snet-busi-cv"
CLUSTER_PRESET = PRESETS["busi"]  # the compiled pipeline's defaults
COMPILED = Path(__file__).with_suffix(".yaml")

def build_pipeline(cluster: bool = True, local_threads: int = 1):
    """The pipeline function; ``cluster`` adds GPU requests, limits, retries and Secrets."""

    step = PipelineTasks(cluster, local_threads)

    @dsl.pipeline(name=PIPELINE_NAME, description=__doc__.strip().splitlines()[0])
    def busi_cv(
        preset: str = CLUSTER_PRESET.name,
        data_path: str = "",
        dvc_repo: str = "",
        dvc_rev: str = "",
        dvc_path: str = "data/busi",
        importer: str = "busi",  # the raw layout of data_path / the DVC path (m2snet-format data needs none)
        n_folds: int = CLUSTER_PRESET.n_folds,
        seed: int = 42,
        # Repeat the CV once per training seed on the same split ("42,43,44"; empty: the config's one seed),
        # as `m2snet cv --seeds`: the table is mean +- std over seeds x folds.
        seeds: str = "",
        n_trials: int = -1,
        tuning_storage: str = "",
        train_overrides: str = "{}",
        experiment: str = PIPELINE_EXPERIMENT,
        model_name: str = DEFAULT_MODEL_NAME,
        # The local run passes its own preset's gate.
        promote_floor: float = CLUSTER_PRESET.promotion.floor,
        promote_margin: float = CLUSTER_PRESET.promotion.margin,
        promote_noskill_margin: float = CLUSTER_PRESET.promotion.noskill_margin,
        # The statistical gate: beat production by a paired 95 % CI above zero when comparable.
        promote_require_ci: bool = CLUSTER_PRESET.promotion.require_ci,
        # project (default) | reference: the paper's test_score.py, to compare with its tables.
        metric_protocol: str = DEFAULT_PROTOCOL,
    ) -> str:
        run_id = dsl.PIPELINE_JOB_ID_PLACEHOLDER
        source = dict(preset=preset, data_path=data_path, dvc_repo=dvc_repo, dvc_rev=dvc_rev, dvc_path=dvc_path,
                      importer=importer)
        with step.guarded_run(finalize_run, "cv-pipeline", run_id=run_id, experiment=experiment,
                              source=source) as (finalize, data):
            split = step(split_dataset(dataset=data.outputs["dataset"], n_folds=n_folds, seed=seed, seeds=seeds,
                                       pipeline_run_id=run_id, experiment=experiment), "split")
            with dsl.ParallelFor(split.outputs["Output"], parallelism=4) as task:
                fold = task.fold
                # Nested tuning: each fold tunes on an inner split of its own training cases, so no
                # reported fold ever took part in choosing the learning rates it is scored with.
                tune = step(tune_hyperparameters(
                    dataset=data.outputs["dataset"], split=split.outputs["split"], preset=preset, fold=fold,
                    seed=task.seed, seeds=seeds, train_overrides=train_overrides, n_trials=n_trials,
                    storage=tuning_storage,
                    pipeline_run_id=run_id, experiment=experiment,
                ), "tune fold (Optuna)")
                train = step.training(train_fold(
                    dataset=data.outputs["dataset"], split=split.outputs["split"],
                    best_params=tune.outputs["best_params"], fold=fold, seed=task.seed, seeds=seeds, preset=preset,
                    train_overrides=train_overrides, pipeline_run_id=run_id, experiment=experiment,
                ), "train fold")
                evaluation = step(evaluate_fold(
                    dataset=data.outputs["dataset"], split=split.outputs["split"],
                    model=train.outputs["model"], fold=fold, seed=task.seed, metric_protocol=metric_protocol,
                ), "evaluate fold")

            table = step(aggregate_cv(
                fold_metrics=dsl.Collected(evaluation.outputs["metrics"]),
                fold_reports=dsl.Collected(evaluation.outputs["report"]),
                pipeline_run_id=run_id, experiment=experiment, metric_protocol=metric_protocol,
            ), "aggregate CV")
            version = step(register_model(
                models=dsl.Collected(train.outputs["model"]), cv_metrics=table.outputs["cv_metrics"],
                split=split.outputs["split"], dataset=data.outputs["dataset"], model_name=model_name,
                dataset_version=data.outputs["Output"],
                pipeline_run_id=run_id, experiment=experiment, metric_protocol=metric_protocol,
            ), "register")
            step(promote_model(
                model_name=model_name, version=version.output, floor=promote_floor, margin=promote_margin,
                noskill_margin=promote_noskill_margin, require_ci=promote_require_ci,
                pipeline_run_id=run_id, experiment=experiment,
            ), "promote")
        # Pipeline outputs must come from the top level: the exit handler returns the registered version.
        return finalize.output

    return busi_cv


busi_cv = build_pipeline(cluster=True)
