"""Importers: one per public layout, each writing the one m2snet format (see m2snet.data.format).

An importer only knows its layout: ``scan(src)`` lists the cases (image, its mask files, label,
subset) and ``mask_to_classes`` turns a decoded source mask into class ids. Everything else --
decoding by content, content sanity checks (a mask is a single-channel two-level map, images and
masks not swapped), size checks, union of several masks, writing PNGs, exact and near-duplicate
clusters, the manifest, validation and the atomic move into place -- is shared in
:func:`import_dataset`, so every format gets the same checks.

Registry: ``@register_importer("name")``; ``list_importers()``; ``get_importer(name, **options)``.
"""

from __future__ import annotations

import logging
import os
import re
import shlex
import types
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Callable, ClassVar, Literal, Union, get_args, get_origin, get_type_hints

import numpy as np
from PIL import Image

from m2snet.data.duplicates import (
    DEFAULT_MAX_DISTANCE,
    ENDOSCOPY_MAX_DISTANCE,
    NearDuplicateConfig,
    find_duplicates,
    perceptual_hashes,
)
from m2snet.data.format import (
    BINARY_MASK_CLASSES,
    DATASET_JSON,
    IMAGES_DIR,
    MASKS_DIR,
    CaseRecord,
    DatasetInfo,
    load_dataset,
    safe_case_id,
    write_dataset,
    write_png,
)
from m2snet.data.images import decode_image
from m2snet.data.validation import validate_dataset
from m2snet.directories import atomic_directory
from m2snet.errors import M2SNetError
from m2snet.progress import bar as progress_bar

log = logging.getLogger(__name__)

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


@dataclass
class SourceCase:
    """One case as found in a source layout."""

    case_id: str
    label: str
    subset: str
    image: Path
    masks: list[Path]
    # The grouping the source itself defines (CVC-ClinicDB: {"sequence": "7"}): extra manifest columns.
    extra: dict[str, str] = field(default_factory=dict)


@dataclass
class Importer:
    """Base importer for binary masks. Subclasses set ``name``/``description`` and implement ``scan``.

    ``threshold``: None = the mask must already be binary (exactly two levels, 0 and one other);
    a number = pixels above it are lesion (for JPEG masks, whose edges carry compression noise).
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    n_classes: ClassVar[int] = 1
    mask_classes: ClassVar[list[str]] = BINARY_MASK_CLASSES
    # Labels whose cases must contain a lesion / must not; checked by validation.
    lesion_labels: ClassVar[list[str]] = []
    empty_labels: ClassVar[list[str]] = []
    allow_duplicates_default: ClassVar[bool] = False
    # Cases of one duplicate cluster under different labels: an error unless the set is known for it.
    allow_label_conflicts_default: ClassVar[bool] = False
    # Near-duplicate threshold (bits) when the import is not given one: where the modality's
    # unrelated images start (see m2snet.data.duplicates).
    near_duplicate_threshold: ClassVar[int] = DEFAULT_MAX_DISTANCE
    # The extra manifest column (SourceCase.extra) whose values the source says belong together (CVC-ClinicDB:
    # ``sequence``, the video of a frame): recorded in dataset.json as ``group_by``, every split's default.
    group_by: ClassVar[str | None] = None

    threshold: int | None = None

    def scan(self, src: Path) -> list[SourceCase]:
        raise NotImplementedError

    def mask_to_classes(self, mask: np.ndarray, path: Path) -> np.ndarray:
        """Grey mask (uint8 [H, W]) -> class ids (uint8 [H, W]); raise M2SNetError on invalid values."""
        if self.threshold is not None:
            return (mask > self.threshold).astype(np.uint8)
        values = np.unique(mask)
        if len(values) > 2 or (len(values) == 2 and values[0] != 0):
            shown = ", ".join(str(v) for v in values[:8]) + (" ..." if len(values) > 8 else "")
            raise M2SNetError(
                f"{path}: mask is not binary (values {shown}); expected 0 and one lesion value "
                "(pass a threshold for JPEG-compressed masks)"
            )
        return (mask > 0).astype(np.uint8)

    def options(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


_IMPORTERS: dict[str, type[Importer]] = {}


def register_importer(name: str) -> Callable[[type[Importer]], type[Importer]]:
    def deco(cls: type[Importer]) -> type[Importer]:
        if name in _IMPORTERS:
            raise ValueError(f"importer {name!r} registered twice")
        cls.name = name
        _IMPORTERS[name] = cls
        return cls

    return deco


def list_importers() -> list[str]:
    return sorted(_IMPORTERS)


def importer_group_by(name: str) -> str | None:
    """The grouping importer ``name`` records (None for an unknown name)."""
    cls = _IMPORTERS.get(name)
    return cls.group_by if cls is not None else None


def get_importer(name: str, **options: Any) -> Importer:
    try:
        cls = _IMPORTERS[name]
    except KeyError:
        raise M2SNetError(f"unknown format {name!r}; known formats: {', '.join(list_importers())}") from None
    known = {f.name for f in fields(cls)}
    unknown = set(options) - known
    if unknown:
        raise M2SNetError(f"format {name!r} has no option(s) {sorted(unknown)}; it accepts {sorted(known)}")
    hints = get_type_hints(cls)
    return cls(**{key: _typed_option(name, key, value, hints[key]) for key, value in options.items()})


def _typed_option(fmt: str, key: str, value: Any, hint: Any) -> Any:
    """An importer option checked against its field's type (``-o threshold=abc`` is refused here, not
    as a numpy error deep in the import); a number given to a text option is taken as its text."""
    allowed = get_args(hint) if get_origin(hint) in (Union, types.UnionType) else (hint,)
    if value is None and type(None) in allowed:
        return value
    if str in allowed and isinstance(value, (str, int, float)) and not isinstance(value, bool):
        return str(value)
    if any(isinstance(value, t) and not (isinstance(value, bool) and t is not bool)
           for t in allowed if isinstance(t, type)):
        return value
    names = " or ".join("None" if t is type(None) else getattr(t, "__name__", str(t)) for t in allowed)
    raise M2SNetError(f"format {fmt!r}: option {key}={value!r} is not a valid {names}")


# --------------------------------------------------------------------------- helpers for layouts


def _images_in(folder: Path) -> list[Path]:
    return sorted(
        p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTS and not p.name.startswith(".")
    )


def _find_dir(src: Path, *names: str) -> Path:
    """The first existing sub-directory of ``src`` among ``names`` (case-insensitive)."""
    if src.is_dir():
        by_lower = {p.name.lower(): p for p in src.iterdir() if p.is_dir()}
        for name in names:
            if name.lower() in by_lower:
                return by_lower[name.lower()]
    raise M2SNetError(f"{src}: expected a sub-directory named one of {list(names)}")


def _option_dir(src: Path, name: str | None, what: str) -> Path | None:
    """The folder an ``images_dir``/``masks_dir`` option names (relative to SRC), or None when not given."""
    if name is None:
        return None
    folder = src / name
    if not folder.is_dir():
        raise M2SNetError(f"{folder}: {what} folder not found")
    return folder


def _pair_by_stem(images_dir: Path, masks_dir: Path, suffix: str = "") -> list[tuple[Path, list[Path]]]:
    """Each image with the mask of the same stem (+ ``suffix``), any image extension."""
    masks = {p.stem: p for p in _images_in(masks_dir)} if masks_dir.is_dir() else {}
    images = [p for p in _images_in(images_dir) if not (suffix and p.stem.endswith(suffix))]
    return [(img, [masks[img.stem + suffix]] if img.stem + suffix in masks else []) for img in images]


# --------------------------------------------------------------------------- layouts


@register_importer("busi")
@dataclass
class BusiImporter(Importer):
    """BUSI as distributed: ``{benign,malignant,normal}/X.png`` + ``X_mask.png`` [+ ``X_mask_1.png`` ...].

    Several masks of one image are merged by union. Masks come as 1-bit, RGB and RGBA (alpha ignored).
    BUSI holds exact-duplicate images, some under two labels (Pawlowska et al. 2023), so duplicates
    and label conflicts are allowed by default: recorded, reported as warnings, kept in one fold.
    """

    description: ClassVar[str] = "BUSI breast ultrasound (benign/ malignant/ normal/, X_mask.png)"
    lesion_labels: ClassVar[list[str]] = ["benign", "malignant"]
    empty_labels: ClassVar[list[str]] = ["normal"]
    allow_duplicates_default: ClassVar[bool] = True
    allow_label_conflicts_default: ClassVar[bool] = True
    classes: tuple[str, ...] = ("benign", "malignant", "normal")

    def scan(self, src: Path) -> list[SourceCase]:
        present = [c for c in self.classes if (src / c).is_dir()]
        if not present:
            raise M2SNetError(f"{src}: no BUSI class folders found (expected {', '.join(self.classes)})")
        cases = []
        mask_re = re.compile(r"^(?P<stem>.+)_mask(_\d+)?$")
        for label in present:
            files = _images_in(src / label)
            masks: dict[str, list[Path]] = {}
            images = []
            for p in files:
                m = mask_re.match(p.stem)
                if m:
                    masks.setdefault(m.group("stem"), []).append(p)
                else:
                    images.append(p)
            for img in images:
                cases.append(SourceCase(safe_case_id(label, img.stem), label, "", img, sorted(masks.pop(img.stem, []))))
            for stem, orphan in masks.items():
                raise M2SNetError(f"{orphan[0]}: mask without an image (expected {src / label / (stem + '.png')})")
        return cases


@register_importer("kvasir")
@dataclass
class KvasirImporter(Importer):
    """Kvasir-SEG: ``images/X.jpg`` + ``masks/X.jpg``; JPEG masks thresholded (default > 127)."""

    description: ClassVar[str] = "Kvasir-SEG polyps (images/, masks/, JPEG masks)"
    near_duplicate_threshold: ClassVar[int] = ENDOSCOPY_MAX_DISTANCE
    lesion_labels: ClassVar[list[str]] = ["polyp"]
    threshold: int | None = 127

    def scan(self, src: Path) -> list[SourceCase]:
        pairs = _pair_by_stem(_find_dir(src, "images"), _find_dir(src, "masks"))
        return [SourceCase(safe_case_id(img.stem), "polyp", "", img, m) for img, m in pairs]


@register_importer("pranet")
@dataclass
class PraNetImporter(Importer):
    """PraNet polyp layout: ``TrainDataset/{images,masks}``, ``TestDataset/<name>/{images,masks}``.

    The manifest's ``subset`` is ``train`` or the test subset's name (CVC-300, Kvasir, ...), so
    evaluation can report per subset.
    """

    description: ClassVar[str] = "PraNet polyp benchmark (TrainDataset/, TestDataset/<name>/)"
    near_duplicate_threshold: ClassVar[int] = ENDOSCOPY_MAX_DISTANCE
    lesion_labels: ClassVar[list[str]] = ["polyp"]
    threshold: int | None = 127

    def scan(self, src: Path) -> list[SourceCase]:
        subsets: list[tuple[str, Path]] = []
        if (src / "TrainDataset").is_dir():
            subsets.append(("train", src / "TrainDataset"))
        if (src / "TestDataset").is_dir():
            subsets += [(p.name, p) for p in sorted((src / "TestDataset").iterdir()) if p.is_dir()]
        if not subsets:
            raise M2SNetError(f"{src}: expected TrainDataset/ and/or TestDataset/<name>/ (PraNet layout)")
        cases = []
        for subset, folder in subsets:
            for img, masks in _pair_by_stem(_find_dir(folder, "images"), _find_dir(folder, "masks")):
                cases.append(SourceCase(safe_case_id(subset, img.stem), "polyp", subset, img, masks))
        return cases


# CVC-ClinicDB's README, transcribed: the first and last frame of each of its 29 video sequences
# (1-based, contiguous, 1..612). The frames of a sequence show one polyp from several points of
# view, so a split keeps a sequence on one side (tests/test_data_clinicdb.py checks the table).
CLINICDB_SEQUENCES: tuple[tuple[int, int], ...] = (
    (1, 25), (26, 50), (51, 67), (68, 78), (79, 103), (104, 126), (127, 151), (152, 177), (178, 199),
    (200, 205), (206, 227), (228, 252), (253, 277), (278, 297), (298, 317), (318, 342), (343, 363),
    (364, 383), (384, 408), (409, 428), (429, 447), (448, 466), (467, 478), (479, 503), (504, 528),
    (529, 546), (547, 571), (572, 591), (592, 612),
)


def clinicdb_sequence(frame: int) -> int | None:
    """The CVC-ClinicDB video sequence (1..29) of frame number ``frame`` (1..612), or None."""
    for k, (first, last) in enumerate(CLINICDB_SEQUENCES, start=1):
        if first <= frame <= last:
            return k
    return None


@register_importer("cvc-clinicdb")
@dataclass
class ClinicDbImporter(Importer):
    """CVC-ClinicDB: ``Original/N.tif`` + ``Ground Truth/N.tif`` (TIFF, or the PNG re-release).

    The manifest's ``sequence`` column is frame N's video sequence from the source's table
    (:data:`CLINICDB_SEQUENCES`; empty for a file not named by a frame number 1..612); dataset.json
    names it as the dataset's ``group_by``, so that ``m2snet data split`` keeps each sequence on one
    side unless told ``--group-by none``. ``images_dir`` /
    ``masks_dir`` (relative to SRC) name the folders when they are not the usual ones, e.g. on a
    copy that has them swapped.
    """

    description: ClassVar[str] = "CVC-ClinicDB polyps (Original/, Ground Truth/, TIFF; options images_dir, masks_dir)"
    near_duplicate_threshold: ClassVar[int] = ENDOSCOPY_MAX_DISTANCE
    lesion_labels: ClassVar[list[str]] = ["polyp"]
    group_by: ClassVar[str | None] = "sequence"
    threshold: int | None = 127
    images_dir: str | None = None
    masks_dir: str | None = None

    def scan(self, src: Path) -> list[SourceCase]:
        root = src / "PNG" if (src / "PNG").is_dir() and not (src / "Original").is_dir() else src
        images = _option_dir(src, self.images_dir, "images") or _find_dir(root, "Original", "images")
        masks = (_option_dir(src, self.masks_dir, "masks")
                 or _find_dir(root, "Ground Truth", "GroundTruth", "masks"))
        cases = []
        for img, m in _pair_by_stem(images, masks):
            sequence = clinicdb_sequence(int(img.stem)) if img.stem.isdigit() else None
            extra = {"sequence": "" if sequence is None else str(sequence)}
            cases.append(SourceCase(safe_case_id("clinicdb", img.stem), "polyp", "", img, m, extra))
        return cases


@register_importer("covid-ct")
@dataclass
class CovidCtImporter(Importer):
    """COVID-19 CT infection slices (Inf-Net layout): ``Imgs/X.jpg`` + ``GT/X.png``.

    The published training set nests them one level down,
    ``TrainingSet/LungInfection-Train/Doctor-label/{Imgs,GT}``: a ``Doctor-label/`` folder is entered
    when SRC has one (the ``Pseudo-label/`` sibling holds machine labels and is not read).
    Slices without infection are legitimate, so no lesion is required.
    """

    description: ClassVar[str] = "COVID-19 CT infection slices (Imgs/, GT/; or Doctor-label/{Imgs,GT})"
    threshold: int | None = 127

    def scan(self, src: Path) -> list[SourceCase]:
        root = src / "Doctor-label" if (src / "Doctor-label").is_dir() else src
        try:
            images, masks = _find_dir(root, "Imgs", "images"), _find_dir(root, "GT", "masks")
        except M2SNetError:
            raise M2SNetError(
                f"{src}: expected Imgs/ and GT/ (Inf-Net COVID-SemiSeg layout), or Doctor-label/Imgs and "
                "Doctor-label/GT as in the published TrainingSet/LungInfection-Train/Doctor-label/; point SRC "
                "at the folder that holds them"
            ) from None
        pairs = _pair_by_stem(images, masks)
        return [SourceCase(safe_case_id(img.stem), "ct", "", img, m) for img, m in pairs]


# GOALS 2022 layer masks: grey level -> (class id, name). Class 0 is background, as everywhere in
# m2snet; the three layers the challenge scores are 1..3.
GOALS_LEVELS = {255: (0, "background"), 0: (1, "RNFL"), 80: (2, "GCIPL"), 160: (3, "choroid")}


@register_importer("goals")
@dataclass
class GoalsImporter(Importer):
    """GOALS 2022 OCT: ``Image/N.png`` + ``Layer_Masks/N.png`` (optionally under ``Train/``).

    Grey levels map to classes: 255 -> 0 background, 0 -> 1 RNFL, 80 -> 2 GCIPL, 160 -> 3 choroid.
    Any other level is an error naming the file.
    """

    description: ClassVar[str] = "GOALS 2022 OCT layers (Image/, Layer_Masks/; 4 classes)"
    n_classes: ClassVar[int] = 4
    mask_classes: ClassVar[list[str]] = [GOALS_LEVELS[k][1] for k in (255, 0, 80, 160)]

    def scan(self, src: Path) -> list[SourceCase]:
        root = src / "Train" if (src / "Train").is_dir() else src
        pairs = _pair_by_stem(_find_dir(root, "Image", "images"), _find_dir(root, "Layer_Masks", "masks"))
        return [SourceCase(safe_case_id("goals", img.stem), "oct", "", img, m) for img, m in pairs]

    def mask_to_classes(self, mask: np.ndarray, path: Path) -> np.ndarray:
        lut = np.full(256, 255, dtype=np.uint8)
        for level, (cls, _) in GOALS_LEVELS.items():
            lut[level] = cls
        out = lut[mask]
        if (out == 255).any():
            bad = sorted(set(np.unique(mask).tolist()) - set(GOALS_LEVELS))
            raise M2SNetError(
                f"{path}: layer mask has grey levels {bad[:8]} outside the GOALS levels {sorted(GOALS_LEVELS)}"
            )
        return out


@register_importer("folder")
@dataclass
class FolderImporter(Importer):
    """A generic pair of folders: ``<images_dir>/X.ext`` + ``<masks_dir>/X<mask_suffix>.ext``."""

    description: ClassVar[str] = (
        "generic images/ + masks/ folders (options: images_dir, masks_dir, mask_suffix, threshold, label)"
    )
    images_dir: str = "images"
    masks_dir: str = "masks"
    mask_suffix: str = ""
    label: str = "lesion"
    threshold: int | None = None

    def scan(self, src: Path) -> list[SourceCase]:
        images, masks = _option_dir(src, self.images_dir, "images"), src / self.masks_dir
        pairs = _pair_by_stem(images, masks, self.mask_suffix)
        return [SourceCase(safe_case_id(img.stem), self.label, "", img, m) for img, m in pairs]


# --------------------------------------------------------------------------- the shared import

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


def _convert_case(
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


def _problems_message(importer: Importer, src: Path, n_cases: int, problems: list[M2SNetError]) -> str:
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


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # a byte the file system's name could not decode (a surrogate escape)
        return False
    return True


def _check_source_names(src: Path, cases: list[SourceCase]) -> None:
    """Refuse source file (or folder) names that are not valid UTF-8, before any work, naming the first one.

    Why refuse rather than import under a substitute: the manifest (UTF-8 CSV, part of the data version)
    records each case's source files by name (``source_image``, ``source_masks``) and the folder names
    that became labels and subsets; a replaced name would record a file that does not exist under it, and
    two names could map to one. Renaming the files (e.g. ``convmv``) keeps the provenance exact.
    """
    bad = []
    for case in cases:
        names = [p.relative_to(src).as_posix() for p in (case.image, *case.masks)]
        wrong = [n for n in names if not _is_utf8(n)]
        if not wrong and not all(_is_utf8(v) for v in (case.label, case.subset, *case.extra.values())):
            wrong = names[:1]  # a label or subset taken from a folder's name
        bad += wrong
    if bad:
        shown = os.fsencode(bad[0]).decode("utf-8", "backslashreplace")
        raise M2SNetError(f"{src}: {len(bad)} source file name(s) are not valid UTF-8, e.g. {shown} (its bytes "
                          "escaped): the manifest records every source file by name; rename them to UTF-8 "
                          "(e.g. `convmv -f latin1 -t utf-8 -r --notest SRC`) and import again")


def import_dataset(
    fmt: str,
    src: str | os.PathLike,
    dest: str | os.PathLike,
    *,
    allow_duplicates: bool | None = None,
    allow_label_conflicts: bool | None = None,
    near_duplicates: NearDuplicateConfig | None = None,
    overwrite: bool = False,
    options: dict[str, Any] | None = None,
    progress: bool = True,
    validate: bool = True,
) -> DatasetInfo:
    """Convert ``src`` (layout ``fmt``) into an m2snet dataset at ``dest``, validated, atomically.

    ``validate=False`` skips the great-expectations pass (the per-file conversion checks and the
    duplicate clustering still run); it exists for machines without great-expectations, such as a
    bare GPU box running a benchmark on data already validated elsewhere, and is logged as a warning.

    Every problem found while converting (undecodable image, missing mask, mask of the wrong size,
    a mask that is a photo, images and masks swapped) is collected and reported together, naming
    each file; then duplicates are clustered (exact + near, ``near_duplicates``; the cluster id is
    the manifest's ``group``) and validation runs on the converted copy. Only a complete and valid
    dataset is moved to ``dest``; on any failure, Ctrl-C or SIGTERM nothing is left behind, and a
    partial directory left by a SIGKILLed import is removed by the next import to ``dest``. The
    validation report is written beside ``dest`` (``<dest>.validation.{json,html}``).
    """
    importer = get_importer(fmt, **(options or {}))
    near = near_duplicates or NearDuplicateConfig(max_distance=importer.near_duplicate_threshold)
    src, dest = Path(src), Path(dest)
    if not src.is_dir():
        raise M2SNetError(f"{src}: source directory not found")
    cases = importer.scan(src)
    if not cases:
        raise M2SNetError(f"{src}: no images found for format {fmt!r} ({importer.description})")
    _check_source_names(src, cases)
    ids = [c.case_id for c in cases]
    clashes = sorted({i for i in ids if ids.count(i) > 1})
    if clashes:
        raise M2SNetError(f"{src}: several source images map to the same case id: {clashes[:5]}")
    allow = importer.allow_duplicates_default if allow_duplicates is None else allow_duplicates
    allow_conflicts = importer.allow_label_conflicts_default if allow_label_conflicts is None else allow_label_conflicts
    notes: list[str] = []
    # Only a previous import (it has dataset.json) is ever replaced, never the source or a folder around it.
    with atomic_directory(dest, overwrite=overwrite, marker=DATASET_JSON, protect=(src,)) as tmp:
        records, hashes, problems = [], [], []
        for case in progress_bar(cases, desc=f"import {fmt}", disable=not progress, leave=False):
            try:
                record, phash = _convert_case(importer, case, src, tmp, notes, hashes=near.enabled)
            except M2SNetError as err:
                problems.append(err)
                continue
            records.append(record)
            hashes.append(phash)
        if problems:
            raise M2SNetError(_problems_message(importer, src, len(cases), problems))
        dups = find_duplicates(
            [r.case_id for r in records], [r.label for r in records], [r.sha256 for r in records],
            np.stack(hashes) if near.enabled else None, near,
        )
        records = [replace(r, group=dups.group_of[r.case_id]) for r in records]
        if dups.conflicts and not allow_conflicts:
            raise M2SNetError(
                f"{src}: {len(dups.conflicts)} duplicate cluster(s) hold cases with different labels "
                "(label conflicts):\n  "
                + "\n  ".join(c.describe() for c in dups.conflicts)
                + "\n  fix the labels, or accept them with --allow-label-conflicts (they stay in one fold)"
            )
        for conflict in dups.conflicts:
            log.warning("label conflict (allowed for %s): %s", fmt, conflict.describe())
        for warning in dups.large_cluster_warnings():
            log.warning("%s", warning)
        # Recorded only where the column holds a value (a ClinicDB copy of unnumbered files has none), and
        # only for importers that have one: other datasets' dataset.json, and so their versions, are unchanged.
        grouping = ({"group_by": importer.group_by} if importer.group_by
                    and any(dict(r.extra).get(importer.group_by) for r in records) else {})
        write_dataset(
            tmp, records, source_format=fmt, n_classes=importer.n_classes,
            mask_classes=importer.mask_classes, labels=sorted({r.label for r in records}),
            extra={
                **grouping,
                "allow_duplicates": allow,
                "allow_label_conflicts": allow_conflicts,
                "near_duplicates": near.to_meta(),
                "lesion_labels": importer.lesion_labels,
                "empty_labels": importer.empty_labels,
                "import_options": importer.options(),
            },
        )
        report = None
        if validate:
            report = validate_dataset(tmp, write_report=False, notes=notes)
            if not report.success:
                raise M2SNetError(f"{src}: the imported data is not valid:\n{report.summary(shown_root=dest)}")
        else:
            log.warning("%s: great-expectations validation skipped (validate=False)", dest)
    for note in notes:
        log.warning("note: %s", note)
    info = load_dataset(dest)
    if report is not None:
        report.write(info)
    log.info("imported %d cases (%s) into %s", len(records), fmt, dest)
    return info
