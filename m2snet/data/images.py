"""The one image decoder: every image m2snet reads (import, cache, validation, evaluation, predict, serving).

:func:`decode_image` opens a file path or raw bytes by content and returns an 8-bit PIL image, so no
caller ever converts a 16-bit or float image by itself (``convert("L")`` clips: a 16-bit picture
became 99.99 % white). What it guarantees:

* **Size cap.** The pixel count is checked from the header, before a pixel is decoded, against
  ``max_pixels`` (default: ``$M2SNET_MAX_PIXELS``, else :data:`DEFAULT_MAX_PIXELS`); PIL's own
  ``DecompressionBombError`` is the same error. Both raise :class:`ImageTooLarge` (the server's 413).
* **High bit depth.** Images (intensities) at 16 bits are scaled to 8 bits by their bit depth,
  ``v >> 8``: the same map PIL applies when it reads a 16-bit colour PNG/TIFF, the exact inverse of
  the usual 8 -> 16 bit conversion (``v * 257``), and right for PNG, whose spec scales samples to the
  full 16-bit range (``sBIT`` records the original depth). The map does not depend on the image, so
  the same tissue is the same grey in every image (a per-image min-max stretch would not be). A
  16-bit image whose values all lie below 4096 (at most 12 of its 16 bits used: 8-bit data or an
  unscaled 10/12-bit sensor in a 16-bit file) would scale to at most 16 grey levels, so it is
  refused naming its range rather than guessed. Floats in [0, 1] are scaled by 255; other floats,
  and wider integers outside 0..255, are refused (their bit depth is unknown).
* **Masks are labels, not intensities.** A high-bit-depth mask keeps its values when they fit in 8
  bits; a two-level mask {0, v} becomes {0, 255}; an 8-bit mask stored at 16 bits (all values
  multiples of 257) is divided back; anything else is refused naming its values.

Errors are :class:`ImageError` (undecodable, unsupported: the server's 400) naming the file (or
whatever ``name`` the caller gives, e.g. ``row 3``). 8-bit images come back exactly as PIL decodes
them (mode ``L``, ``RGB``, ``RGBA``, ``P``, ``1``, ...), so imports of 8-bit sources stay pixel-exact.
"""

from __future__ import annotations

import contextlib
import io
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Literal, Union

import numpy as np
from PIL import Image, UnidentifiedImageError

from m2snet.errors import M2SNetError

Kind = Literal["image", "mask"]
Source = Union[str, os.PathLike, bytes, bytearray]

MAX_PIXELS_ENV = "M2SNET_MAX_PIXELS"
# 50 MP: 7071 x 7071, far above any public set this project reads (BUSI ~ 0.3 MP, Kvasir-SEG
# <= 2 MP); what such images cost the server at peak: docs/serving.md, bench/serve_memory.py.
DEFAULT_MAX_PIXELS = 50_000_000
# 16-bit images whose maximum is below this use at most 12 bits: refused (see the module docstring).
_MIN_16BIT_MAX = 1 << 12
# PIL modes holding 8-bit samples: returned as decoded.
_EIGHT_BIT_MODES = {"1", "L", "P", "LA", "PA", "La", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "LAB", "HSV"}


class ImageError(M2SNetError):
    """An image that cannot be decoded or has no faithful 8-bit form (a client error: HTTP 400)."""


class ImageTooLarge(ImageError):
    """An image with more pixels than the configured limit (HTTP 413)."""


@dataclass(frozen=True)
class DecodedImage:
    image: Image.Image  # 8-bit (see the module docstring)
    format: str | None  # the content's format as PIL names it (PNG, JPEG, TIFF, ...)
    source_mode: str  # the PIL mode as stored, before any conversion ("I;16", "RGB", ...)


def positive_env(name: str, default: int, what: str = "number of pixels") -> int:
    """``$name`` as a positive integer ("5e7" reads as well as "50000000"), else ``default``; anything
    else is one line of M2SNetError naming the variable."""
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    try:
        value = int(float(text))
    except (ValueError, OverflowError):
        value = 0
    if value <= 0:
        raise M2SNetError(f"{name}={text!r}: expected a positive {what}")
    return value


def max_pixels() -> int:
    """The pixel limit: ``$M2SNET_MAX_PIXELS`` when set (a positive integer), else DEFAULT_MAX_PIXELS."""
    return positive_env(MAX_PIXELS_ENV, DEFAULT_MAX_PIXELS)


def _label(source: Source, name: str | None) -> str:
    if name is not None:
        return name
    return "image bytes" if isinstance(source, (bytes, bytearray)) else str(source)


def check_size(width: int, height: int, where: str, limit: int | None = None) -> None:
    """Raise ImageTooLarge when ``width * height`` is above ``limit`` (default: :func:`max_pixels`)."""
    limit = max_pixels() if limit is None else limit
    if width * height > limit:
        raise ImageTooLarge(
            f"{where}: image is {width}x{height} = {width * height} pixels, above the limit of {limit} "
            f"({MAX_PIXELS_ENV})"
        )


@contextlib.contextmanager
def _opened(source: Source, where: str) -> Iterator[Image.Image]:
    """PIL's lazy open of a path or bytes (header only until ``load``), with PIL's own bomb error as ours.

    Our cap (:func:`check_size`) is the caller's to check; PIL's warning between its limit and twice it
    is noise here.
    """
    data = io.BytesIO(bytes(source)) if isinstance(source, (bytes, bytearray)) else source
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(data) as im:
                yield im
    except Image.DecompressionBombError as err:
        raise ImageTooLarge(f"{where}: image is too large to decode ({err})") from None


def decode_image(source: Source, kind: Kind = "image", *, name: str | None = None,
                 limit: int | None = None) -> DecodedImage:
    """Decode a file path or raw bytes by content into an 8-bit image (see the module docstring).

    ``name`` is what errors call the source (default: the path); ``limit`` the pixel cap (default:
    :func:`max_pixels`).
    """
    where = _label(source, name)
    try:
        with _opened(source, where) as im:
            check_size(*im.size, where, limit)
            im.load()
            fmt, mode = im.format, im.mode
            image = im.copy()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        if not isinstance(source, (bytes, bytearray)) and Path(source).suffix.lower() in (".tif", ".tiff"):
            decoded = _decode_tiff(Path(source), kind, where, limit)
            if decoded is not None:
                return decoded
        raise ImageError(f"{where}: cannot decode {kind} ({err})") from None
    return DecodedImage(to_8bit(image, kind, where), fmt, mode)


def read_image(source: Source, kind: Kind = "image", *, name: str | None = None,
               limit: int | None = None) -> Image.Image:
    """:func:`decode_image`'s 8-bit image alone."""
    return decode_image(source, kind, name=name, limit=limit).image


def read_rgb(source: Source, *, name: str | None = None, limit: int | None = None) -> np.ndarray:
    """An image file / bytes as uint8 [H, W, 3]."""
    return np.asarray(read_image(source, "image", name=name, limit=limit).convert("RGB"))


def read_mask(source: Source, *, name: str | None = None, limit: int | None = None) -> np.ndarray:
    """A mask file / bytes as uint8 [H, W] labels."""
    return np.asarray(read_image(source, "mask", name=name, limit=limit).convert("L"))


def check_image(source: Source, *, name: str | None = None, limit: int | None = None) -> tuple[int, int]:
    """Open ``source``'s header only: (width, height), or ImageError / ImageTooLarge naming it.

    Cheap (nothing is decoded): for refusing a batch before any work or output starts.
    """
    where = _label(source, name)
    try:
        with _opened(source, where) as im:
            size = im.size
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        if not isinstance(source, (bytes, bytearray)) and Path(source).suffix.lower() in (".tif", ".tiff"):
            size = _tiff_size(Path(source), where)
        else:
            raise ImageError(f"{where}: cannot decode image ({err})") from None
    check_size(*size, where, limit)
    return size


def _tiff_size(path: Path, where: str) -> tuple[int, int]:
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            shape = tif.pages[0].shape
    except Exception as err:  # noqa: BLE001 - any reader failure is "cannot decode", named below
        raise ImageError(f"{where}: cannot decode image ({err})") from None
    return int(shape[1]), int(shape[0])


def _decode_tiff(path: Path, kind: Kind, where: str, limit: int | None) -> DecodedImage | None:
    """TIFFs PIL cannot read (float, odd compressions) through tifffile; None when it cannot either."""
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            page = tif.pages[0]
            shape = page.shape
            if len(shape) < 2:
                return None
            check_size(int(shape[1]), int(shape[0]), where, limit)
            arr = page.asarray()
    except ImageTooLarge:
        raise
    except Exception:  # noqa: BLE001 - not readable by tifffile either: the caller's error stands
        return None
    return DecodedImage(to_8bit(arr, kind, where), "TIFF", str(arr.dtype))


def to_8bit(image: Image.Image | np.ndarray, kind: Kind = "image", where: str = "image") -> Image.Image:
    """An image or array of any bit depth as an 8-bit PIL image (module docstring for the rules).

    8-bit PIL images are returned unchanged; arrays are read by dtype: uint8 as is, uint16 as 16 bits,
    other integers when they lie in 0..255, bool as 0/255 (image) or 0/1 (mask), floats by the rules above.
    """
    if isinstance(image, Image.Image):
        if image.mode in _EIGHT_BIT_MODES:
            return image
        arr = np.asarray(image)
        if image.mode.startswith("I;16"):
            arr = arr.astype(np.uint16, copy=False)
    else:
        arr = np.asarray(image)
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (3, 4)):
        raise ImageError(f"{where}: {kind} of shape {arr.shape}: expected [H, W], [H, W, 3] or [H, W, 4]")
    out = _mask_labels(arr, where) if kind == "mask" else _intensities(arr, where)
    if out.ndim == 2:
        return Image.fromarray(out, "L")
    return Image.fromarray(out, "RGB" if out.shape[2] == 3 else "RGBA")


def _intensities(arr: np.ndarray, where: str) -> np.ndarray:
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype == np.bool_:
        return arr.astype(np.uint8) * 255
    if arr.dtype == np.uint16:
        top = int(arr.max(initial=0))
        if top < _MIN_16BIT_MAX:
            raise ImageError(
                f"{where}: 16-bit image uses only values {int(arr.min(initial=0))}..{top} (at most 12 of its 16 "
                "bits); scaling by the 16-bit range would leave it nearly black. Save it as 8-bit (or scale it "
                "to the 16-bit range) first"
            )
        return (arr >> 8).astype(np.uint8)
    if np.issubdtype(arr.dtype, np.floating):
        if not np.isfinite(arr).all() or arr.min(initial=0) < 0 or arr.max(initial=0) > 1:
            raise ImageError(
                f"{where}: floating-point image with values outside [0, 1] "
                f"({float(np.nanmin(arr)):g}..{float(np.nanmax(arr)):g}); save it as 8- or 16-bit"
            )
        return np.round(arr * 255).astype(np.uint8)
    if np.issubdtype(arr.dtype, np.integer):
        lo, hi = int(arr.min(initial=0)), int(arr.max(initial=0))
        if 0 <= lo and hi <= 255:
            return arr.astype(np.uint8)
        raise ImageError(
            f"{where}: {arr.dtype} image with values {lo}..{hi}: its bit depth is unknown; save it as 8- or 16-bit"
        )
    raise ImageError(f"{where}: unsupported pixel type {arr.dtype}")


def _mask_labels(arr: np.ndarray, where: str) -> np.ndarray:
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype == np.bool_:
        return arr.astype(np.uint8)
    if np.issubdtype(arr.dtype, np.floating):
        if not np.isfinite(arr).all() or not np.array_equal(arr, np.round(arr)):
            raise ImageError(f"{where}: floating-point mask with non-integer values; a mask holds class labels")
        arr = arr.astype(np.int64)
    if not np.issubdtype(arr.dtype, np.integer):
        raise ImageError(f"{where}: unsupported mask pixel type {arr.dtype}")
    values = np.unique(arr)
    if values[0] >= 0 and values[-1] <= 255:
        return arr.astype(np.uint8)
    if len(values) == 2 and values[0] == 0:
        return np.where(arr > 0, 255, 0).astype(np.uint8)  # a two-level mask stored at 16 bits: 0 / 65535
    if values[0] >= 0 and values[-1] <= 65535 and not (values % 257).any():
        return (arr // 257).astype(np.uint8)  # an 8-bit mask converted to 16 bits (v * 257)
    shown = ", ".join(str(v) for v in values[:8]) + (" ..." if len(values) > 8 else "")
    bits = "16-bit" if arr.dtype == np.uint16 else str(arr.dtype)
    raise ImageError(
        f"{where}: {bits} mask has values {shown}: labels above 255 that are not a two-level mask; "
        "a mask holds class labels 0..255"
    )
