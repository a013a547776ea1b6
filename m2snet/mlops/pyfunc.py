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
"Benchmarks"); ``export=FILE`` serves a file written by ``m2snet export`` at any precision (fp32 / int8
ONNX, bf16 bundle: the precision is in the file). Without either artifact, or with
``M2SNET_SERVE_BACKEND=torch``, PyTorch serves the checkpoints in fp32.

The model is logged as code (MLflow's "models from code", :mod:`m2snet.mlops.pyfunc_model`), not as a
cloudpickled :class:`SegmentationPyfunc`: loading it runs m2snet's code and reads the checkpoints with
``torch.load(weights_only=True)``; nothing in the model is unpickled. :func:`require_model_code`
refuses a model logged the old, pickled way (re-log it from its checkpoints).
"""

from __future__ import annotations

import base64
import binascii
import ctypes
import filecmp
import functools
import gc
import io
import logging
import os
import tempfile
import threading
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
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.types import ColSpec, Schema
from PIL import Image

import m2snet
from m2snet.data.images import ImageTooLarge, check_image, positive_env, read_image, read_mask
from m2snet.errors import M2SNetError
from m2snet.runtime import resolve_device

MODEL_CONFIG_TTA = "tta_flip"
MODEL_CODE = Path(__file__).with_name("pyfunc_model.py")  # what MLflow runs to load the model
# What the pyfunc needs at load time beyond the m2snet code it carries (code_paths).
_RUNTIME_DISTRIBUTIONS = ("torch", "torchvision", "timm", "segmentation-models-pytorch", "numpy",
                          "pillow", "pandas", "mlflow", "pyyaml", "onnx", "onnxruntime")
ONNX_ARTIFACT = "onnx"  # the fp32 ONNX export made at logging time (onnx=True)
EXPORT_ARTIFACT = "export"  # a file from `m2snet export`, any precision (export=...)
GUARD_ARTIFACT = "input_guard"  # m2snet.evaluation.guard.InputGuard (safetensors), fitted at registration
log = logging.getLogger("m2snet.mlops.pyfunc")
# NAME/VERSION the server answers as (set by `m2snet serve`, which resolved the alias at start); every
# response carries it in the column model_version, so a client sees which version answered.
SERVED_MODEL_ENV = "M2SNET_SERVED_MODEL"
BACKEND_ENV = "M2SNET_SERVE_BACKEND"  # "torch" forces PyTorch even when the ONNX export is present
# What one request may make the server decode, in pixels, summed over its images and checked from their
# headers before any is decoded: the per-image cap ($M2SNET_MAX_PIXELS) alone let one 2.5 MB request of
# twelve 7000 x 7000 PNGs take the server from 1.87 to 5.16 GB. 100 MP: two images at the per-image cap,
# ~330 BUSI images, 50 Kvasir-SEG ones.
MAX_REQUEST_PIXELS_ENV = "M2SNET_MAX_REQUEST_PIXELS"
DEFAULT_MAX_REQUEST_PIXELS = 100_000_000
# How many requests decode and predict at once in one server process (the others wait their turn): two
# concurrent 6-image requests peaked at 7.7 GB. A wait longer than the queue timeout is answered 503.
MAX_CONCURRENT_ENV = "M2SNET_MAX_CONCURRENT_PREDICTIONS"
DEFAULT_MAX_CONCURRENT = 1
QUEUE_TIMEOUT_ENV = "M2SNET_PREDICTION_QUEUE_S"
DEFAULT_QUEUE_TIMEOUT_S = 50  # under the scoring server's own 60 s request timeout: our 503 says why
# A batch holds at most this many decoded pixels (and at most the predictor's batch size): small images
# batch together, a large one is decoded, predicted and encoded alone, then freed before the next.
BATCH_PIXELS = 4_000_000
# After a request that decoded more than this, freed memory is handed back to the system (malloc_trim).
TRIM_AFTER_PIXELS = 10_000_000


def encode_image(image, fmt: str = "PNG") -> str:
    """base64 text of an image (PIL image, array, or raw bytes) for the ``image`` input column."""
    if isinstance(image, (bytes, bytearray)):
        return base64.b64encode(bytes(image)).decode("ascii")
    if not isinstance(image, Image.Image):
        image = Image.fromarray(np.asarray(image))
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return base64.b64encode(buf.getvalue()).decode("ascii")


class ServingError(MlflowException):
    """A client error MLflow's scoring server answers with our HTTP status and our one-line message.

    The server maps error codes to statuses without 413, and on the way out rewrites ``message`` to
    ``Failed to predict data '<the whole input frame>'. Error: ...`` (multi-line, echoing the request);
    this keeps the status given and the first message set.
    """

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message, error_code=INVALID_PARAMETER_VALUE)
        self.status = status

    @property
    def message(self) -> str:
        return self._message

    @message.setter
    def message(self, value: str) -> None:
        if not hasattr(self, "_message"):
            self._message = value

    def get_http_status_code(self) -> int:
        return self.status


def _payload(text: str, row: int) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, TypeError, ValueError) as err:
        raise ServingError(f"row {row}: column 'image' is not base64 PNG/JPEG bytes ({err})") from None


def _as_serving_error(err: M2SNetError) -> ServingError:
    return ServingError(str(err), status=413 if isinstance(err, ImageTooLarge) else 400)


def decode_image(text: str, row: int = 0):
    """base64 image text -> 8-bit PIL image through the one decoder (m2snet.data.images: bit depth,
    pixel cap ``$M2SNET_MAX_PIXELS``); bad input is a ServingError naming the row: 413 for an
    image above the cap (refused from its header, before decoding), 400 otherwise."""
    try:
        return read_image(_payload(text, row), "image", name=f"row {row}")
    except M2SNetError as err:
        raise _as_serving_error(err) from None


def max_request_pixels() -> int:
    """The per-request decoded-pixel budget: ``$M2SNET_MAX_REQUEST_PIXELS``, else DEFAULT_MAX_REQUEST_PIXELS."""
    return positive_env(MAX_REQUEST_PIXELS_ENV, DEFAULT_MAX_REQUEST_PIXELS)


def check_request_pixels(sizes: Sequence[tuple[int, int]], budget: int | None = None) -> int:
    """The pixels a request's images (their ``(width, height)``, from headers) decode to; a ServingError 413
    naming the budget when their sum is above it."""
    budget = max_request_pixels() if budget is None else budget
    total = sum(w * h for w, h in sizes)
    if total > budget:
        raise ServingError(
            f"request of {len(sizes)} images decodes to {total} pixels, above the per-request budget of {budget} "
            f"pixels ({MAX_REQUEST_PIXELS_ENV}); send fewer or smaller images per request", status=413)
    return total


def pixel_batches(sizes: Sequence[tuple[int, int]], max_images: int, max_pixels: int) -> list[range]:
    """Consecutive index ranges of at most ``max_images`` images and ``max_pixels`` pixels each (an image
    larger than ``max_pixels`` alone)."""
    batches, start, pixels = [], 0, 0
    for i, (w, h) in enumerate(sizes):
        if i > start and (i - start >= max_images or pixels + w * h > max_pixels):
            batches.append(range(start, i))
            start, pixels = i, 0
        pixels += w * h
    if start < len(sizes):
        batches.append(range(start, len(sizes)))
    return batches


@functools.lru_cache(maxsize=1)
def _prediction_slots() -> threading.BoundedSemaphore:
    return threading.BoundedSemaphore(positive_env(MAX_CONCURRENT_ENV, DEFAULT_MAX_CONCURRENT, "number"))


@functools.lru_cache(maxsize=1)
def _malloc_trim():
    try:
        return ctypes.CDLL(None).malloc_trim  # glibc; absent elsewhere (musl, macOS)
    except (OSError, AttributeError):
        return None


def release_freed_memory() -> None:
    """Collect garbage and hand freed heap pages back to the system: without it glibc keeps the arenas a
    large request grew (the issue's server stayed at 4.07 GB idle after its big requests)."""
    gc.collect()
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def decode_mask(text: str) -> np.ndarray:
    """The ``mask`` output column back to a uint8 array."""
    return read_mask(base64.b64decode(text), name="mask")


class SegmentationPyfunc(mlflow.pyfunc.PythonModel):
    """Averages the probabilities of the checkpoints in the model's artifacts."""

    def load_context(self, context) -> None:
        from m2snet.evaluation.predict import Predictor

        keys = sorted((k for k in context.artifacts if k.startswith("checkpoint_")),
                      key=lambda k: int(k.rsplit("_", 1)[1]))
        config = context.model_config or {}
        self.served_as = os.environ.get(SERVED_MODEL_ENV, "")
        device = resolve_device(os.environ.get("M2SNET_DEVICE", "auto"))
        exported = context.artifacts.get(EXPORT_ARTIFACT) or context.artifacts.get(ONNX_ARTIFACT)
        guard = context.artifacts.get(GUARD_ARTIFACT)
        if exported and os.environ.get(BACKEND_ENV, "onnx") != "torch":
            from m2snet.mlops.export import load_exported

            self.predictor = load_exported(exported, device=device)
            if guard:  # the exported graph gives probabilities only: the guard's features need PyTorch
                log.warning("input guard not applied: the %s backend has no encoder features (set %s=torch)",
                            type(self.predictor).__name__, BACKEND_ENV)
            return
        self.predictor = Predictor.from_checkpoints(
            [context.artifacts[k] for k in keys], device=device, tta_flip=bool(config.get(MODEL_CONFIG_TTA, False)),
        )
        if guard:
            from m2snet.evaluation.guard import InputGuard

            self.predictor.attach_guard(InputGuard.load(guard))

    # The annotation tells MLflow the input is a DataFrame, a type it infers no schema from: it validates
    # nothing more (the signature logged with the model does that) and no longer warns, in colour, on every
    # load of the model, that predict() has no type hints.
    def predict(self, context, model_input: pd.DataFrame, params=None):
        try:
            return self._predict(model_input)
        except MlflowException:
            raise
        except Exception:  # the server boundary: the trace goes to the server log, not to the client
            log.exception("prediction failed")
            raise ServingError("internal error while predicting (the server log has the details)",
                                    status=500) from None

    def _predict(self, model_input):
        import torch

        if not isinstance(model_input, pd.DataFrame) or "image" not in model_input.columns:
            raise ServingError("input must be a DataFrame with a string column 'image' (base64 PNG/JPEG)")
        texts = model_input["image"].tolist()
        try:  # every row's header first: a request with an oversized or foreign row 9 costs no prediction
            sizes = [check_image(_payload(text, row), name=f"row {row}") for row, text in enumerate(texts)]
        except M2SNetError as err:
            raise _as_serving_error(err) from None
        total = check_request_pixels(sizes)
        # One request decodes at a time per process (by default): concurrent requests wait here holding only
        # their encoded bytes, instead of each decoding its images at once.
        slots = _prediction_slots()
        wait = positive_env(QUEUE_TIMEOUT_ENV, DEFAULT_QUEUE_TIMEOUT_S, "number of seconds")
        if not slots.acquire(timeout=wait):
            raise ServingError(f"server busy: other requests held the prediction slots ({MAX_CONCURRENT_ENV}) for "
                               f"{wait} s; retry later", status=503)
        try:
            return self._predict_batches(texts, sizes, torch)
        finally:
            slots.release()
            if total > TRIM_AFTER_PIXELS:
                release_freed_memory()

    def _predict_batches(self, texts: list[str], sizes: list[tuple[int, int]], torch) -> pd.DataFrame:
        # One pixel-bounded batch decoded, predicted and encoded at a time (a large image alone), each freed
        # before the next: a request holds at most one batch of full-size images and probability maps.
        masks, fractions, ood_scores = [], [], []
        guarded = getattr(self.predictor, "guard", None) is not None
        for rows in pixel_batches(sizes, self.predictor.batch_size, BATCH_PIXELS):
            images = [decode_image(texts[row], row) for row in rows]
            try:
                with torch.inference_mode():
                    if guarded:
                        probs, scores = self.predictor.predict_guarded(images)
                        ood_scores.extend(float(v) for v in scores)
                    else:
                        probs = self.predictor.predict_proba(images)
            except M2SNetError as err:
                raise ServingError(str(err)) from None
            del images
            probs = list(probs)
            while probs:
                prob = probs.pop(0)  # dropped as it is encoded: never all full-size maps of a batch at once
                mask = self.predictor.to_mask(prob)
                del prob
                fractions.append(float((mask > 0).mean()))
                if self.predictor.n_classes == 1:
                    mask *= 255
                masks.append(encode_image(mask))
                del mask
        out = pd.DataFrame({"mask": masks, "foreground_fraction": fractions})
        if getattr(self, "served_as", ""):  # served by `m2snet serve`, which knows the version it resolved
            out["model_version"] = self.served_as
        if guarded:  # > 1: further from the training images than held-out cases of the training data were
            out["ood_score"] = ood_scores
            out["ood_flag"] = [v > 1.0 for v in ood_scores]
        return out


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
            info = _log(paths, name, registered_model_name, input_example, tta_flip, onnx_path,
                        Path(export) if export is not None else None, Path(guard) if guard is not None else None)
            _link_stored_copies(info, paths)
            return info
    finally:
        if tracking_uri:
            mlflow.set_tracking_uri(previous_uri)


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
            "code now: log its checkpoints again with m2snet.mlops.pyfunc.log_segmentation_model)")
