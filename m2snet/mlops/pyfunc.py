"""The MLflow pyfunc model: one checkpoint or an ensemble of checkpoints behind a JSON-friendly API.

Input: a DataFrame with a string column ``image`` holding base64-encoded PNG/JPEG bytes (so it
travels through ``mlflow models serve`` as JSON: ``{"dataframe_split": {"columns": ["image"],
"data": [["<b64>"]]}}``). Output: a DataFrame with ``mask`` (base64 PNG of the mask at the
input's original size: 0/255 for a binary model, class ids for a multi-class one) and
``foreground_fraction`` (share of non-background pixels).

Several checkpoints (e.g. the folds of a cross-validation) are stored as artifacts
``checkpoint_0``, ``checkpoint_1``, ... and their probabilities are averaged before thresholding.
Set ``M2SNET_DEVICE`` (e.g. ``cuda``) to choose the device at load time (default: auto).

With ``onnx=True`` the ensemble is also exported (m2snet.mlops.export) as artifact ``onnx`` and served
through ONNX Runtime (the same pre- and post-processing; 2x+ faster on a CPU, see README
"Benchmarks"); without that artifact, or with ``M2SNET_SERVE_BACKEND=torch``, PyTorch serves.

The model is logged as code (MLflow's "models from code", :mod:`m2snet.mlops.pyfunc_model`), not as a
cloudpickled :class:`SegmentationPyfunc`: loading it runs m2snet's code and reads the checkpoints with
``torch.load(weights_only=True)``; nothing in the model is unpickled. :func:`require_model_code`
refuses a model logged the old, pickled way (re-log it from its checkpoints).
"""

from __future__ import annotations

import base64
import binascii
import io
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
from mlflow.models import ModelSignature
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.types import ColSpec, Schema
from PIL import Image, UnidentifiedImageError

import m2snet
from m2snet.common import M2SNetError, resolve_device

MODEL_CONFIG_TTA = "tta_flip"
MODEL_CODE = Path(__file__).with_name("pyfunc_model.py")  # what MLflow runs to load the model
# What the pyfunc needs at load time beyond the m2snet code it carries (code_paths).
_RUNTIME_DISTRIBUTIONS = ("torch", "torchvision", "timm", "segmentation-models-pytorch", "numpy",
                          "pillow", "pandas", "mlflow", "pyyaml", "onnx", "onnxruntime")
ONNX_ARTIFACT = "onnx"
BACKEND_ENV = "M2SNET_SERVE_BACKEND"  # "torch" forces PyTorch even when the ONNX export is present


def encode_image(image, fmt: str = "PNG") -> str:
    """base64 text of an image (PIL image, array, or raw bytes) for the ``image`` input column."""
    if isinstance(image, (bytes, bytearray)):
        return base64.b64encode(bytes(image)).decode("ascii")
    if not isinstance(image, Image.Image):
        image = Image.fromarray(np.asarray(image))
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def decode_image(text: str, row: int = 0):
    """base64 PNG/JPEG text -> PIL image; bad input raises an MLflow 400-class error naming the row."""
    try:
        data = base64.b64decode(text, validate=True)
        image = Image.open(io.BytesIO(data))
        image.load()
        return image
    except (binascii.Error, TypeError, ValueError, UnidentifiedImageError, OSError) as err:
        raise MlflowException(f"row {row}: column 'image' is not base64 PNG/JPEG bytes ({err})",
                              error_code=INVALID_PARAMETER_VALUE) from None


def decode_mask(text: str) -> np.ndarray:
    """The ``mask`` output column back to a uint8 array."""
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(text))))


class SegmentationPyfunc(mlflow.pyfunc.PythonModel):
    """Averages the probabilities of the checkpoints in the model's artifacts."""

    def load_context(self, context) -> None:
        from m2snet.evaluation.predict import Predictor

        keys = sorted((k for k in context.artifacts if k.startswith("checkpoint_")),
                      key=lambda k: int(k.rsplit("_", 1)[1]))
        config = context.model_config or {}
        device = resolve_device(os.environ.get("M2SNET_DEVICE", "auto"))
        if ONNX_ARTIFACT in context.artifacts and os.environ.get(BACKEND_ENV, "onnx") != "torch":
            from m2snet.mlops.export import OnnxPredictor

            self.predictor = OnnxPredictor(context.artifacts[ONNX_ARTIFACT], device=device)
            return
        self.predictor = Predictor.from_checkpoints(
            [context.artifacts[k] for k in keys], device=device, tta_flip=bool(config.get(MODEL_CONFIG_TTA, False)),
        )

    def predict(self, context, model_input, params=None):
        import torch

        if not isinstance(model_input, pd.DataFrame) or "image" not in model_input.columns:
            raise MlflowException("input must be a DataFrame with a string column 'image' (base64 PNG/JPEG)",
                                  error_code=INVALID_PARAMETER_VALUE)
        images = [decode_image(t, i) for i, t in enumerate(model_input["image"].tolist())]
        with torch.inference_mode():
            probs = self.predictor.predict_proba(images)
        masks, fractions = [], []
        for prob in probs:
            mask = self.predictor.to_mask(prob)
            fractions.append(float((mask > 0).mean()))
            if self.predictor.n_classes == 1:
                mask = mask * 255
            masks.append(encode_image(mask.astype(np.uint8)))
        return pd.DataFrame({"mask": masks, "foreground_fraction": fractions})


def signature():
    return ModelSignature(inputs=Schema([ColSpec("string", "image")]),
                          outputs=Schema([ColSpec("string", "mask"), ColSpec("double", "foreground_fraction")]))


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
):
    """Log the checkpoint(s) as one pyfunc model; return MLflow's ``ModelInfo``.

    ``run_id``: the run to attach the model to (opened for the call; default: the active run).
    ``registered_model_name``: also register it as a new version of that model.
    ``onnx``: also export the ensemble to ONNX (checked against PyTorch) and serve through it.
    """
    paths = [Path(p) for p in checkpoints]
    missing = [str(p) for p in paths if not p.is_file()]
    if not paths or missing:
        raise M2SNetError(f"log_segmentation_model: checkpoint(s) not found: {missing or 'none given'}")
    previous_uri = mlflow.get_tracking_uri()
    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
    active = mlflow.active_run()
    ctx = (mlflow.start_run(run_id=run_id)
           if run_id and (active is None or active.info.run_id != run_id) else nullcontext())
    try:
        with ctx, tempfile.TemporaryDirectory(prefix="m2snet-onnx-") as tmp:
            onnx_path = None
            if onnx:
                from m2snet.mlops.export import export_onnx

                onnx_path = export_onnx(paths, Path(tmp) / "model.onnx", tta_flip=tta_flip).path
            return _log(paths, name, registered_model_name, input_example, tta_flip, onnx_path)
    finally:
        if tracking_uri:
            mlflow.set_tracking_uri(previous_uri)


def _log(paths: list[Path], name: str, registered_model_name: str | None, input_example, tta_flip: bool,
         onnx_path: Path | None = None):
    artifacts = {f"checkpoint_{i}": str(p) for i, p in enumerate(paths)}
    if onnx_path is not None:
        artifacts[ONNX_ARTIFACT] = str(onnx_path)
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
                  "backend": "onnxruntime" if onnx_path is not None else "torch"},
    )


def require_model_code(model_dir: str | os.PathLike) -> None:
    """Refuse a pyfunc model whose loading would unpickle its ``python_model`` (logged before m2snet
    logged models as code, or not by m2snet): MLflow would run whatever that pickle names."""
    from mlflow.models import Model
    from mlflow.models.model import MODEL_CODE_PATH

    try:
        flavor = Model.load(str(model_dir)).flavors.get(mlflow.pyfunc.FLAVOR_NAME, {})
    except (MlflowException, OSError) as err:
        raise M2SNetError(f"{model_dir}: not an MLflow model ({err})") from err
    if MODEL_CODE_PATH not in flavor:
        raise M2SNetError(
            f"{model_dir}: this model's python_model is a pickle; refusing to unpickle it (m2snet logs models as "
            "code now: log its checkpoints again with m2snet.mlops.pyfunc.log_segmentation_model)")
