"""How every task of an m2snet pipeline is set up, and the frame both pipelines share.

On a cluster a task gets the MLflow/S3 Secrets as environment and the image's non-root user, a training
task one GPU, limits and retries; for the kfp local runner a task gets its torch threads. Every task has
a display name (the cluster UI's and the local console's label) and no caching.
"""

# No `from __future__ import annotations`: kfp reads the pipeline signature's real types.

import contextlib
from dataclasses import dataclass
from typing import Any, Iterator

from kfp import dsl, kubernetes

from m2snet.kubeflow.components import prepare_dataset
from m2snet.kubeflow.image import COMPONENT_GID, COMPONENT_UID

# Kubernetes Secrets (k8s/base/secrets.yaml) mounted as environment on the cluster.
MLFLOW_SECRET = "mlflow-client"
MLFLOW_SECRET_KEYS = ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD",
                      "MLFLOW_S3_ENDPOINT_URL",
                      # The Optuna storage (PostgreSQL) the tune step uses when tuning_storage is empty:
                      # a URL with a password belongs in a Secret, not in a run parameter.
                      "M2SNET_OPTUNA_STORAGE")
S3_SECRET = "s3-credentials"
S3_SECRET_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")

# Per-fold training resources on the cluster.
TRAIN_GPU = "nvidia.com/gpu"
TRAIN_CPU_LIMIT = "8"
TRAIN_MEMORY_LIMIT = "48G"
TRAIN_RETRIES = 2  # transient failures: node preemption, a flaky tracking server


def _with_cluster_env(task: dsl.PipelineTask) -> dsl.PipelineTask:
    kubernetes.use_secret_as_env(task, secret_name=MLFLOW_SECRET,
                                 secret_key_to_env={k: k for k in MLFLOW_SECRET_KEYS})
    kubernetes.use_secret_as_env(task, secret_name=S3_SECRET, secret_key_to_env={k: k for k in S3_SECRET_KEYS})
    # The image's own non-root user. The SDK has no setting for allowPrivilegeEscalation or capabilities:
    # KFP's backend sets allowPrivilegeEscalation: false and drops all capabilities on every task container
    # (kfp-kubernetes 2.17, set_security_context's docstring).
    kubernetes.set_security_context(task, run_as_user=COMPONENT_UID, run_as_group=COMPONENT_GID, run_as_non_root=True)
    return task


@dataclass(frozen=True)
class PipelineTasks:
    """The task settings of one build of a pipeline: ``cluster`` (Secrets, GPU) or the local runner's threads."""

    cluster: bool
    local_threads: int = 1  # torch threads of a local task (the CV pipeline runs two fold tasks at once)

    def __call__(self, task: dsl.PipelineTask, display_name: str) -> dsl.PipelineTask:
        """Every task: no caching, its display name; on a cluster its Secrets, locally its threads."""
        # Every step writes to MLflow: a cached step would skip its side effects on a re-run.
        task.set_caching_options(False)
        task.set_display_name(display_name)
        if self.cluster:
            _with_cluster_env(task)
        else:
            task.set_env_variable("OMP_NUM_THREADS", str(self.local_threads))
        return task

    def training(self, task: dsl.PipelineTask, display_name: str) -> dsl.PipelineTask:
        """A training task; on a cluster one GPU, CPU/memory limits, retries, the GPU nodes' taint tolerated."""
        self(task, display_name)
        if self.cluster:
            (task.set_accelerator_type(TRAIN_GPU).set_accelerator_limit(1)
             .set_cpu_limit(TRAIN_CPU_LIMIT).set_memory_limit(TRAIN_MEMORY_LIMIT)
             .set_retry(num_retries=TRAIN_RETRIES, backoff_duration="60s", backoff_factor=2.0))
            # GPU nodes are commonly tainted so that only GPU work lands there.
            kubernetes.add_toleration(task, key=TRAIN_GPU, operator="Exists", effect="NoSchedule")
        return task

    @contextlib.contextmanager
    def guarded_run(self, finalize: Any, name: str, *, run_id: str, experiment: str,
                    source: dict[str, str]) -> Iterator[tuple[dsl.PipelineTask, dsl.PipelineTask]]:
        """A pipeline's frame: its exit handler (``finalize``: runs after everything, failed or not, so no
        parent MLflow run is left RUNNING) and, inside it, the first task: the data, imported and validated
        (``source``: prepare_dataset's preset, data_path, dvc_repo, dvc_rev, dvc_path, importer)."""
        final = self(finalize(pipeline_run_id=run_id, experiment=experiment), "finalize")
        with dsl.ExitHandler(final, name=name):
            data = self(prepare_dataset(**source, pipeline_run_id=run_id, experiment=experiment),
                        "prepare + validate")
            yield final, data


