"""The pyfunc's request and response: base64 images in (decoded through the one image decoder) and
out, the per-request pixel budget, pixel-bounded batches, and :class:`ServingError`, the client error
MLflow's scoring server answers with our status and message."""

from __future__ import annotations

import base64
import binascii
import io
from typing import Sequence

import numpy as np
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from PIL import Image

from m2snet.data.images import ImageTooLarge, positive_env, read_image, read_mask
from m2snet.errors import M2SNetError

# What one request may make the server decode, in pixels, summed over its images and checked from their
# headers before any is decoded: the per-image cap ($M2SNET_MAX_PIXELS) alone let one 2.5 MB request of
# twelve 7000 x 7000 PNGs take the server from 1.87 to 5.16 GB. 100 MP: two images at the per-image cap,
# ~330 BUSI images, 50 Kvasir-SEG ones.
MAX_REQUEST_PIXELS_ENV = "M2SNET_MAX_REQUEST_PIXELS"
DEFAULT_MAX_REQUEST_PIXELS = 100_000_000


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


def payload_bytes(text: str, row: int) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, TypeError, ValueError) as err:
        raise ServingError(f"row {row}: column 'image' is not base64 PNG/JPEG bytes ({err})") from None


def as_serving_error(err: M2SNetError) -> ServingError:
    return ServingError(str(err), status=413 if isinstance(err, ImageTooLarge) else 400)


def decode_image(text: str, row: int = 0):
    """base64 image text -> 8-bit PIL image through the one decoder (m2snet.data.images: bit depth,
    pixel cap ``$M2SNET_MAX_PIXELS``); bad input is a ServingError naming the row: 413 for an
    image above the cap (refused from its header, before decoding), 400 otherwise."""
    try:
        return read_image(payload_bytes(text, row), "image", name=f"row {row}")
    except M2SNetError as err:
        raise as_serving_error(err) from None


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


def decode_mask(text: str) -> np.ndarray:
    """The ``mask`` output column back to a uint8 array."""
    return read_mask(base64.b64decode(text), name="mask")
