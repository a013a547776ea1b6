"""Compile the Kubeflow pipeline, and submit it to a cluster's Kubeflow Pipelines API.

The local run (the kfp local runner) is :mod:`m2snet.kubeflow.runner`; both run the pipelines of
:mod:`m2snet.kubeflow.pipelines`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Sequence
from urllib.parse import urlparse

import yaml

from m2snet.errors import M2SNetError
from m2snet.mlops.mlflow_store import PIPELINE_EXPERIMENT


def compiled_pipeline_path() -> Path:
    from m2snet.kubeflow.pipelines import busi_cv

    return busi_cv.COMPILED


def compile_pipeline(out: str | os.PathLike | None = None) -> Path:
    """Compile the cluster pipeline (GPU requests, limits, retries, Secrets) to YAML."""
    from kfp import compiler

    from m2snet.kubeflow.pipelines import busi_cv

    out = Path(out) if out else compiled_pipeline_path()
    compiler.Compiler().compile(busi_cv.build_pipeline(cluster=True), str(out))
    return out


def pipeline_parameters(package: str | os.PathLike | None = None) -> dict[str, str]:
    """Name -> KFP parameter type of the compiled pipeline's inputs."""
    path = Path(package) if package else compiled_pipeline_path()
    if not path.is_file():
        raise M2SNetError(f"{path}: compiled pipeline not found (run `m2snet pipeline compile`)")
    # Document 1: the PipelineSpec; document 2 (if any): the Kubernetes platform spec.
    spec = next(iter(yaml.safe_load_all(path.read_text())), None) or {}
    params = spec.get("root", {}).get("inputDefinitions", {}).get("parameters", {})
    return {name: d.get("parameterType", "STRING") for name, d in params.items()}


def parse_params(items: Sequence[str], package: str | os.PathLike | None = None) -> dict[str, Any]:
    """``k=v`` strings -> typed pipeline arguments, checked against the compiled pipeline's inputs."""
    known = pipeline_parameters(package)
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise M2SNetError(f"--param {item!r}: expected NAME=VALUE")
        if key not in known:
            raise M2SNetError(f"--param {key}: not a parameter of the pipeline; known: {sorted(known)}")
        kind = known[key]
        try:
            if kind == "NUMBER_INTEGER":
                out[key] = int(raw)
            elif kind == "NUMBER_DOUBLE":
                out[key] = float(raw)
            elif kind == "BOOLEAN":
                if raw.lower() not in ("true", "false", "1", "0"):
                    raise ValueError(raw)
                out[key] = raw.lower() in ("true", "1")
            else:
                out[key] = raw
        except ValueError:
            raise M2SNetError(f"--param {key}={raw}: expected a {kind.lower().replace('_', ' ')}") from None
    return out


def submit(
    host: str,
    *,
    params: Mapping[str, Any] | None = None,
    experiment: str = PIPELINE_EXPERIMENT,
    run_name: str | None = None,
    namespace: str | None = None,
    package: str | os.PathLike | None = None,
    timeout_s: float = 15.0,
) -> tuple[str, str]:
    """Submit the compiled pipeline to a KFP endpoint; return (run id, run URL)."""
    package = Path(package) if package else compiled_pipeline_path()
    if not package.is_file():
        raise M2SNetError(f"{package}: compiled pipeline not found (run `m2snet pipeline compile`)")
    url = urlparse(host if "://" in host else f"http://{host}")
    if url.scheme not in ("http", "https") or not url.hostname:
        raise M2SNetError(f"--host {host!r}: expected an http(s) URL of the Kubeflow Pipelines API")
    # Fail fast and clearly: kfp.Client retries its health check for half a minute with tracebacks.
    import requests

    health = f"{host.rstrip('/')}/apis/v2beta1/healthz"
    try:
        resp = requests.get(health, timeout=timeout_s)
    except requests.RequestException as err:
        raise M2SNetError(f"Kubeflow Pipelines endpoint {host} is unreachable ({type(err).__name__}: {err}); "
                          "check --host (e.g. `kubectl port-forward -n kubeflow svc/ml-pipeline-ui 8080:80`)") from None
    if resp.status_code != 200:
        raise M2SNetError(f"{host} does not look like a Kubeflow Pipelines v2 API: GET {health} answered "
                          f"HTTP {resp.status_code}")
    import kfp

    try:
        client = kfp.Client(host=host, namespace=namespace)
        result = client.create_run_from_pipeline_package(
            str(package), arguments=dict(params or {}), run_name=run_name, experiment_name=experiment,
            namespace=namespace,
        )
    except Exception as err:  # HTTP/auth errors of the KFP API, re-raised as M2SNetError
        raise M2SNetError(f"submitting {package.name} to {host} failed: {type(err).__name__}: {err}") from err
    base = host.rstrip("/")
    return result.run_id, f"{base}/#/runs/details/{result.run_id}"
