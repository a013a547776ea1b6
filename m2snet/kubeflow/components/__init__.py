"""Kubeflow Pipelines v2 components: one thin component per pipeline step.

Each component body imports ``m2snet`` and calls ONE library function: the CV pipeline's in
``m2snet.workflows.steps``, the fixed-split pipeline's (``protocol.py``) in ``m2snet.workflows.protocols``;
all logic lives in the library (the CLI and these components are two doors onto it). The
component's source is embedded into the compiled pipeline YAML, so bodies import inside the
function, and the image they run in is ``m2snet.kubeflow.image.COMPONENT_IMAGE`` (docker/Dockerfile).

Artifacts: the dataset and the split travel as ``Dataset`` artifacts (a directory / a JSON file),
fold checkpoints as ``Model`` artifacts, scores as ``Metrics`` artifacts.
"""

from m2snet.kubeflow.components.aggregate import aggregate_cv
from m2snet.kubeflow.components.evaluate import evaluate_fold
from m2snet.kubeflow.components.finalize import finalize_run
from m2snet.kubeflow.components.prepare import prepare_dataset
from m2snet.kubeflow.components.promote import promote_model
from m2snet.kubeflow.components.register import register_model
from m2snet.kubeflow.components.split import split_dataset
from m2snet.kubeflow.components.train import train_fold
from m2snet.kubeflow.components.tune import tune_hyperparameters

__all__ = [
    "aggregate_cv",
    "evaluate_fold",
    "finalize_run",
    "prepare_dataset",
    "promote_model",
    "register_model",
    "split_dataset",
    "train_fold",
    "tune_hyperparameters",
]
