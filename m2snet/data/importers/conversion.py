"""Converting one source case: decode by content, check that a mask is a mask (and not swapped with its
image), check sizes, merge several masks, write the PNGs; and the one message for all failed cases."""

from __future__ import annotations

import shlex
from dataclasses import fields
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image

from m2snet.data.duplicates import perceptual_hashes
from m2snet.data.format import IMAGES_DIR, MASKS_DIR, CaseRecord, write_png
from m2snet.data.images import decode_image
from m2snet.data.importers.base import Importer, SourceCase
from m2snet.errors import M2SNetError

# PIL's format names for the extensions a source may use; a file whose content is another format
# is decoded by its content and the disagreement noted.
_EXT_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".bmp": "BMP", ".tif": "TIFF", ".tiff": "TIFF"}
# Content checks on source masks, before anything is converted.
_CHANNEL_DISAGREE = 48  # grey levels by which the channels of a colour pixel differ
_MAX_COLOUR_FRACTION = 0.01  # an RGB mask may have this many such pixels (JPEG chroma noise at edges)
_MID_GREY = (32, 223)  # neither background nor lesion in a two-level map
_MAX_MID_FRACTION = 0.10  # a thresholded (JPEG) mask may have this many mid-grey pixels (its edges)
_TWO_LEVEL_FRACTION = 0.98  # an image this much black or white looks like a mask


def _decode(path: Path, what: Literal["image", "mask"], notes: list[str] | None = None):
    """Decode an image by its content with the one decoder (m2snet.data.images: 8-bit out, pixel cap,
    errors naming the file).

    When the content's format is not the one the extension names (a JPEG saved as ``.png``), the
    file is still read, and a note saying so is appended to ``notes``.
    """
    decoded = decode_image(path, what)
    expected = _EXT_FORMATS.get(path.suffix.lower())
    if notes is not None and expected and decoded.format and decoded.format != expected:
        notes.append(
            f"{path}: content is {decoded.format}, not the {expected} its extension says (read as {decoded.format})"
        )
    return decoded.image


def _colour_fraction(image) -> float:
    """Fraction of pixels whose colour channels disagree (0 for single-channel images)."""
    if image.mode not in ("RGB", "RGBA", "P", "CMYK", "YCbCr", "LAB", "HSV"):
        return 0.0
    arr = np.asarray(image.convert("RGB"), dtype=np.int16)
    return float(((arr.max(axis=2) - arr.min(axis=2)) > _CHANNEL_DISAGREE).mean())


def _grey(mask_image) -> np.ndarray:
    """A source mask of any mode as uint8 [H, W]: max over colour channels (they agree), alpha ignored."""
    if mask_image.mode == "1":
        return np.asarray(mask_image, dtype=np.uint8) * 255
    if mask_image.mode in ("RGB", "RGBA", "P", "LA", "CMYK"):
        arr = np.asarray(mask_image.convert("RGB"))
        return arr.max(axis=2)
    return np.asarray(mask_image.convert("L"))


def _mid_fraction(grey: np.ndarray) -> float:
    lo, hi = _MID_GREY
    return float(((grey > lo) & (grey < hi)).mean())


def _mask_content_problem(importer: Importer, mask_image, path: Path) -> str | None:
    """Why a decoded source mask is not a mask (a colour photo, a grey photo), or None.

    A mask is single-channel, or colour with channels that agree (RGB masks of BUSI, JPEG masks of
    Kvasir); for a binary set it must also be two-level apart from its (JPEG-blurred) edges. The
    exact value check of unthresholded masks comes later, in ``mask_to_classes``.
    """
    colour = _colour_fraction(mask_image)
    if colour > _MAX_COLOUR_FRACTION:
        return (f"{path}: mask is a colour image ({100 * colour:.0f}% of pixels have channels that disagree); "
                "a mask must be single-channel or grey")
    if importer.n_classes == 1:
        mid = _mid_fraction(_grey(mask_image))
        if mid > _MAX_MID_FRACTION:
            return (f"{path}: mask is not a two-level map ({100 * mid:.0f}% of pixels are mid-grey, "
                    f"at most {100 * _MAX_MID_FRACTION:.0f}% expected at lesion edges)")
    return None


def _looks_like_mask(image) -> bool:
    """A single-channel (or channel-agreeing) image that is almost all black and white, with both."""
    if _colour_fraction(image) > _MAX_COLOUR_FRACTION:
        return False
    grey = _grey(image)
    lo, hi = _MID_GREY
    black, white = float((grey <= lo).mean()), float((grey >= hi).mean())
    return black + white >= _TWO_LEVEL_FRACTION and white > 0 and black > 0


class SwappedCase(M2SNetError):
    """A case whose image looks like a mask and whose mask looks like a photo."""

    def __init__(self, message: str, image: Path, mask: Path) -> None:
        super().__init__(message)
        self.image, self.mask = image, mask


def convert_case(
    importer: Importer, case: SourceCase, src: Path, out: Path, notes: list[str], hashes: bool = True,
) -> tuple[CaseRecord, np.ndarray | None]:
    """Check, convert and write one case; return its record and its perceptual hashes (when ``hashes``)."""
    if not case.masks:
        raise M2SNetError(f"{case.image}: no mask found for this image")
    image = _decode(case.image, "image", notes)
    width, height = image.size
    merged = np.zeros((height, width), dtype=np.uint8)
    for mask_path in case.masks:
        mask_image = _decode(mask_path, "mask", notes)
        problem = _mask_content_problem(importer, mask_image, mask_path)
        if problem is not None and _looks_like_mask(image):
            raise SwappedCase(
                f"{case.image}: images and masks look swapped: this image is a two-level grey map and its "
                f"mask {mask_path.name} is a photo ({problem.split(': ', 1)[1]})",
                case.image, mask_path,
            )
        if mask_image.size != image.size:
            raise M2SNetError(
                f"{mask_path}: mask is {mask_image.size[0]}x{mask_image.size[1]} but its image "
                f"{case.image.name} is {width}x{height}"
            )
        if problem is not None:
            raise M2SNetError(problem)
        classes = importer.mask_to_classes(_grey(mask_image), mask_path)
        # Union of several masks: for class ids, a later non-background label wins.
        merged = np.where(classes > 0, classes, merged)
    rgb = image.convert("RGB")
    image_path, mask_path = out / IMAGES_DIR / f"{case.case_id}.png", out / MASKS_DIR / f"{case.case_id}.png"
    sha = write_png(image_path, rgb)
    mask_sha = write_png(mask_path, Image.fromarray(merged, mode="L"))
    record = CaseRecord(
        case_id=case.case_id, label=case.label, image_path=image_path, mask_path=mask_path,
        height=height, width=width, sha256=sha, lesion_area=int((merged > 0).sum()),
        group=case.case_id, subset=case.subset, mask_sha256=mask_sha,
        source_image=case.image.relative_to(src).as_posix(),
        source_masks=tuple(m.relative_to(src).as_posix() for m in case.masks),
        extra=tuple(sorted(case.extra.items())),
    )
    return record, perceptual_hashes(rgb) if hashes else None


def _swap_fix(importer: Importer, src: Path, swapped: SwappedCase) -> str:
    """How to import a swapped copy as it is: the importer's folder options when it has them (so a
    read-only copy needs no rename), else a rename of the folders."""
    names = {f.name for f in fields(importer)}
    if {"images_dir", "masks_dir"} <= names:
        try:
            image_dir = swapped.image.parent.relative_to(src).as_posix()
            mask_dir = swapped.mask.parent.relative_to(src).as_posix()
        except ValueError:
            image_dir, mask_dir = "IMAGES", "MASKS"
        return f"-o images_dir={shlex.quote(mask_dir)} -o masks_dir={shlex.quote(image_dir)}"
    return "rename the image and mask folders into each other"


def problems_message(importer: Importer, src: Path, n_cases: int, problems: list[M2SNetError]) -> str:
    """All conversion problems in one message; a mostly swapped dataset is said once, clearly."""
    swapped = [p for p in problems if isinstance(p, SwappedCase)]
    head = f"{src}: {len(problems)} of {n_cases} cases could not be imported"
    if len(swapped) * 2 > n_cases:
        fix = _swap_fix(importer, src, swapped[0])
        examples = "\n  ".join(str(p) for p in swapped[:3])
        others = [str(p) for p in problems if not isinstance(p, SwappedCase)]
        return (
            f"{src}: images and masks look swapped in {len(swapped)} of {n_cases} cases: the 'images' are "
            f"two-level grey maps and the 'masks' are photos. Swap the folders ({fix}) and import again.\n"
            f"  e.g. {examples}" + ("".join(f"\n  {o}" for o in others[:20]))
        )
    return head + ":\n  " + "\n  ".join(str(p) for p in problems)
