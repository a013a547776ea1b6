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
through ONNX Runtime (the same pre- and post-processing; 2x+ faster on a CPU, see
docs/benchmarks.md); ``export=FILE`` serves a file written by ``m2snet export`` at any precision (fp32 / int8
ONNX, bf16 bundle: the precision is in the file). Without either artifact, or with
``M2SNET_SERVE_BACKEND=torch``, PyTorch serves the checkpoints in fp32.

The model is logged as code (MLflow's "models from code", :mod:`m2snet.mlops.pyfunc_model`;
:mod:`m2snet.mlops.pyfunc_logging`), not as a
cloudpickled :class:`SegmentationPyfunc`: loading it runs m2snet's code and reads the checkpoints with
``torch.load(weights_only=True)``; nothing in the model is unpickled.
:func:`m2snet.mlops.pyfunc_logging.require_model_code` refuses a model logged the old, pickled way (re-log it
from its checkpoints). The request and response (base64 images, pixel budget, batches):
:mod:`m2snet.mlops.pyfunc_io`.
"""

from __future__ import annotations

import ctypes
import functools
import gc
import logging
import os
import threading

import mlflow.pyfunc
import pandas as pd
from mlflow.exceptions import MlflowException

from m2snet.data.images import check_image, positive_env
from m2snet.errors import M2SNetError
from m2snet.mlops.pyfunc_io import (
    ServingError,
    as_serving_error,
    check_request_pixels,
    decode_image,
    encode_image,
    payload_bytes,
    pixel_batches,
)
from m2snet.runtime import resolve_device

MODEL_CONFIG_TTA = "tta_flip"
ONNX_ARTIFACT = "onnx"  # the fp32 ONNX export made at logging time (onnx=True)
EXPORT_ARTIFACT = "export"  # a file from `m2snet export`, any precision (export=...)
GUARD_ARTIFACT = "input_guard"  # m2snet.evaluation.guard.InputGuard (safetensors), fitted at registration
log = logging.getLogger("m2snet.mlops.pyfunc")
# NAME/VERSION the server answers as (set by `m2snet serve`, which resolved the alias at start); every
# response carries it in the column model_version, so a client sees which version answered.
SERVED_MODEL_ENV = "M2SNET_SERVED_MODEL"
BACKEND_ENV = "M2SNET_SERVE_BACKEND"  # "torch" forces PyTorch even when the ONNX export is present
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
        else:
            self.predictor = Predictor.from_checkpoints(
                [context.artifacts[k] for k in keys], device=device,
                tta_flip=bool(config.get(MODEL_CONFIG_TTA, False)))
        if guard:
            from m2snet.evaluation.guard import InputGuard

            # A bad guard file or one for another ensemble is an error, as before; only an export older than the
            # guard's feature outputs is served unguarded, said once.
            input_guard = InputGuard.load(guard)
            if self.predictor.guardable:
                self.predictor.attach_guard(input_guard)
            else:
                log.warning("input guard not applied: %s was exported without the guard's feature outputs (an "
                            "older export); export it again, or set %s=torch", exported, BACKEND_ENV)

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
            sizes = [check_image(payload_bytes(text, row), name=f"row {row}") for row, text in enumerate(texts)]
        except M2SNetError as err:
            raise as_serving_error(err) from None
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
