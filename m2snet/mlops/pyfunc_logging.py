"""Logging checkpoints as one MLflow pyfunc model (as code: nothing pickled), and the check that
refuses a model whose loading would unpickle its ``python_model``."""

from __future__ import annotations

import filecmp
import logging
import os
import tempfile
from contextlib import nullcontext
from importlib import metadata
from pathlib import Path
from typing import Sequence

import mlflow
import mlflow.pyfunc
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.models import Model, ModelSignature
from mlflow.types import ColSpec, Schema

import m2snet
from m2snet.errors import M2SNetError
from m2snet.mlops.mlflow_store import tracking_uri_scope
from m2snet.mlops.pyfunc import EXPORT_ARTIFACT, GUARD_ARTIFACT, MODEL_CONFIG_TTA, ONNX_ARTIFACT
from m2snet.mlops.pyfunc_io import encode_image

MODEL_CODE = Path(__file__).with_name("pyfunc_model.py")  # what MLflow runs to load the model
# What the pyfunc needs at load time beyond the m2snet code it carries (code_paths).
_RUNTIME_DISTRIBUTIONS = ("torch", "torchvision", "timm", "segmentation-models-pytorch", "numpy",
                          "pillow", "pandas", "mlflow", "pyyaml", "onnx", "onnxruntime")
log = logging.getLogger("m2snet.mlops.pyfunc")


def signature():
    return ModelSignature(inputs=Schema([ColSpec("string", "image")]),
                          outputs=Schema([ColSpec("string", "mask"), ColSpec("double", "foreground_fraction"),
                                          ColSpec("string", "model_version", required=False),
                                          ColSpec("double", "ood_score", required=False),
                                          ColSpec("boolean", "ood_flag", required=False)]))


def default_input_example(size: int = 48):
    """A small grey ultrasound-like PNG, enough for MLflow to check the model runs."""
    rng = np.random.default_rng(0)
    image = (rng.random((size, size)) * 255).astype(np.uint8)
    return pd.DataFrame({"image": [encode_image(image)]})


def pip_requirements() -> list[str]:
    """Pinned runtime requirements of this environment (the m2snet code itself goes in code_paths)."""
    reqs = []
    for dist in _RUNTIME_DISTRIBUTIONS:
        try:
            version = metadata.version(dist).split("+")[0]
            reqs.append(f"{dist}=={version}")
        except metadata.PackageNotFoundError:
            reqs.append(dist)
    return reqs


def log_segmentation_model(
    checkpoints: Sequence[str | os.PathLike],
    name: str = "model",
    registered_model_name: str | None = None,
    input_example=None,
    *,
    run_id: str | None = None,
    tracking_uri: str | None = None,
    tta_flip: bool = False,
    onnx: bool = False,
    export: str | os.PathLike | None = None,
    guard: str | os.PathLike | None = None,
):
    """Log the checkpoint(s) as one pyfunc model; return MLflow's ``ModelInfo``.

    ``run_id``: the run to attach the model to (opened for the call; default: the active run).
    ``registered_model_name``: also register it as a new version of that model.
    ``onnx``: also export the ensemble to ONNX (checked against PyTorch) and serve through it.
    ``export``: serve this file from ``m2snet export`` (any precision; made from the same checkpoints).
    ``guard``: an input guard file for these checkpoints (m2snet.evaluation.guard), applied to every prediction.
    """
    paths = [Path(p) for p in checkpoints]
    missing = [str(p) for p in paths if not p.is_file()]
    if not paths or missing:
        raise M2SNetError(f"log_segmentation_model: checkpoint(s) not found: {missing or 'none given'}")
    with tracking_uri_scope(tracking_uri) if tracking_uri else nullcontext():
        active = mlflow.active_run()
        ctx = (mlflow.start_run(run_id=run_id)
               if run_id and (active is None or active.info.run_id != run_id) else nullcontext())
        with ctx, tempfile.TemporaryDirectory(prefix="m2snet-onnx-") as tmp:
            onnx_path = None
            if onnx:
                from m2snet.mlops.export import export_onnx

                onnx_path = export_onnx(paths, Path(tmp) / "model.onnx", tta_flip=tta_flip).path
            info = _log(paths, name, registered_model_name, input_example, tta_flip, onnx_path,
                        Path(export) if export is not None else None, Path(guard) if guard is not None else None)
            _link_stored_copies(info, paths)
            return info


def _log(paths: list[Path], name: str, registered_model_name: str | None, input_example, tta_flip: bool,
         onnx_path: Path | None = None, export: Path | None = None, guard: Path | None = None):
    artifacts = {f"checkpoint_{i}": str(p) for i, p in enumerate(paths)}
    if guard is not None:
        artifacts[GUARD_ARTIFACT] = str(guard)
    backend = "torch"
    if onnx_path is not None:
        artifacts[ONNX_ARTIFACT], backend = str(onnx_path), "onnxruntime"
    if export is not None:
        from m2snet.mlops.export import is_bundle, read_export_meta

        precision = read_export_meta(export)["precision"]  # refuses a file that is not an m2snet export
        artifacts[EXPORT_ARTIFACT] = str(export)
        backend = f"{'torch' if is_bundle(export) else 'onnxruntime'}-{precision}"
    return mlflow.pyfunc.log_model(
        name=name,
        python_model=str(MODEL_CODE),  # models from code: nothing is pickled
        artifacts=artifacts,
        code_paths=[str(Path(m2snet.__file__).parent)],
        pip_requirements=pip_requirements(),
        signature=signature(),
        input_example=input_example if input_example is not None else default_input_example(),
        model_config={MODEL_CONFIG_TTA: tta_flip},
        registered_model_name=registered_model_name,
        metadata={"m2snet_version": m2snet.__version__, "n_checkpoints": len(paths),
                  "backend": backend},
    )


def _link_stored_copies(info, sources: Sequence[Path]) -> int:
    """In a local artifact store, make each checkpoint the model stored a hard link to the file it was copied
    from (same bytes, same file system); return how many.

    A checkpoint is ~120 MB, and a pipeline stores each fold's three times (the runner's task output, the
    fold run's model, the registered ensemble): linked, the store holds one copy of each; the runner's copy
    can be removed after the run without touching them. A store that is not a local folder (S3, a server's
    proxied store) or a copy on another file system is left as it is.
    """
    from urllib.parse import urlparse
    from urllib.request import url2pathname

    location = mlflow.get_logged_model(info.model_id).artifact_location if info.model_id else ""
    url = urlparse(location)
    if url.scheme not in ("", "file"):
        return 0
    model_dir = Path(url2pathname(url.path))
    try:
        artifacts = Model.load(str(model_dir)).flavors[mlflow.pyfunc.FLAVOR_NAME].get("artifacts", {})
    except (MlflowException, OSError, KeyError):
        return 0
    linked = 0
    for i, source in enumerate(sources):
        stored = model_dir / artifacts.get(f"checkpoint_{i}", {}).get("path", "")
        if stored == model_dir or not stored.is_file() or stored.samefile(source):
            continue
        if stored.stat().st_size != source.stat().st_size or not filecmp.cmp(stored, source, shallow=False):
            continue
        tmp = stored.with_name(f".{stored.name}.link")
        try:
            os.link(source, tmp)
            os.replace(tmp, stored)
            linked += 1
        except OSError as err:  # another file system, a store that forbids links: the copy stays
            log.debug("kept the copy %s of %s (%s)", stored, source, err)
            tmp.unlink(missing_ok=True)
    return linked


def require_model_code(model_dir: str | os.PathLike) -> None:
    """Refuse a pyfunc model whose loading would unpickle its ``python_model`` (logged before m2snet
    logged models as code, or not by m2snet): MLflow would run whatever that pickle names."""
    from mlflow.models.model import MODEL_CODE_PATH

    try:
        flavor = Model.load(str(model_dir)).flavors.get(mlflow.pyfunc.FLAVOR_NAME, {})
    except (MlflowException, OSError) as err:
        raise M2SNetError(f"{model_dir}: not an MLflow model ({err})") from err
    if MODEL_CODE_PATH not in flavor:
        raise M2SNetError(
            f"{model_dir}: this model's python_model is a pickle; refusing to unpickle it (m2snet logs models as "
            "code now: log its checkpoints again with m2snet.mlops.pyfunc_logging.log_segmentation_model)")
