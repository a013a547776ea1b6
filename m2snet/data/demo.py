"""A small synthetic breast-ultrasound-like dataset in the BUSI layout, byte-identical for a seed.

It exists so that the whole pipeline (import, validate, split, train, evaluate, register, serve) runs
on a fresh clone with no download: ``m2snet data demo data/raw-demo`` then
``m2snet data import --format busi data/raw-demo data/demo``.

What it imitates from BUSI, because the importer and the model should meet the same difficulties:
- grey images with layered tissue, multiplicative speckle and depth attenuation;
- hypoechoic (dark) lesions: benign ones oval with smooth borders and posterior enhancement,
  malignant ones irregular/spiculated with a posterior acoustic shadow; ``normal`` has no lesion;
- masks stored in BUSI's mixed modes (1-bit, RGB), an occasional second lesion in ``X_mask_1.png``,
  and images of two aspect ratios.
Byte-identity: one numpy PCG64 stream per case (seeded from (seed, class, index)), PIL filters only,
and PNGs written through :func:`m2snet.data.format.encode_png` (fixed options, no metadata).
"""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

from m2snet.data.format import encode_png
from m2snet.data.importers import import_dataset
from m2snet.directories import atomic_directory
from m2snet.errors import M2SNetError
from m2snet.files import write_json

log = logging.getLogger(__name__)

DEMO_CLASSES = ("benign", "malignant", "normal")
DEFAULT_N_PER_CLASS = (12, 8, 6)
DEFAULT_SIZE = 128
# Written at the root of the raw (BUSI-layout) demo: what marks a folder as one m2snet wrote, so
# ``--overwrite`` replaces a previous demo and never a user's folder. A dot-file outside the class
# folders, so no importer reads it as an image. (The formatted demo has dataset.json instead.)
DEMO_MARKER = ".m2snet-demo.json"


@dataclass(frozen=True)
class LesionStyle:
    """Shape and echo pattern of one lesion class."""

    harmonics: int  # how many Fourier terms perturb the border (more = more irregular)
    amplitude: float  # relative size of the border perturbation
    darkness: float  # lesion echo level relative to the surrounding tissue
    posterior: float  # > 1: posterior enhancement (cysts, fibroadenomas); < 1: acoustic shadow


STYLES = {
    "benign": LesionStyle(harmonics=3, amplitude=0.10, darkness=0.25, posterior=1.25),
    "malignant": LesionStyle(harmonics=11, amplitude=0.22, darkness=0.35, posterior=0.55),
}


def _lesion_mask(rng: np.random.Generator, h: int, w: int, style: LesionStyle) -> np.ndarray:
    """A star-shaped region whose radius is a random Fourier series in the angle."""
    cy = rng.uniform(0.35, 0.65) * h
    cx = rng.uniform(0.3, 0.7) * w
    r0 = rng.uniform(0.10, 0.20) * min(h, w)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    theta = np.arctan2(yy - cy, (xx - cx) / 1.4)  # lesions are wider than tall ("parallel" orientation)
    radius = np.full_like(theta, 1.0)
    for k in range(2, 2 + style.harmonics):
        amp = style.amplitude * rng.uniform(0.3, 1.0) / (1 + 0.15 * (k - 2))
        radius += amp * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
    dist = np.hypot(yy - cy, (xx - cx) / 1.4)
    return dist < r0 * radius


def _tissue(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Echo level of normal tissue: bright skin line, darker fat, brighter fibroglandular layer."""
    depth = np.linspace(0.0, 1.0, h)[:, None]
    skin = 0.9 * np.exp(-((depth - 0.04) / 0.02) ** 2)
    fat_end = rng.uniform(0.25, 0.4)
    gland = 0.55 + 0.15 * np.sin(depth * rng.uniform(8, 14) + rng.uniform(0, 6))
    level = np.where(depth < fat_end, 0.35, gland) + skin
    # Wavy layer boundaries: low-frequency noise, blurred so it looks like anatomy, not pixels.
    noise = rng.uniform(0, 255, size=(h, w)).astype(np.uint8)
    blurred = np.asarray(Image.fromarray(noise).filter(ImageFilter.GaussianBlur(radius=max(h, w) / 24)))
    level = level + 0.6 * (blurred.astype(np.float64) / 255.0 - 0.5)
    attenuation = np.exp(-1.2 * depth)  # deeper tissue returns less echo
    return np.clip(level, 0.05, 1.2) * attenuation


def _speckle(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Fully developed speckle: Rayleigh-distributed, slightly correlated along the beam."""
    raw = rng.rayleigh(scale=1.0, size=(h, w))
    raw8 = np.clip(raw * 80, 0, 255).astype(np.uint8)
    blurred = np.asarray(Image.fromarray(raw8).filter(ImageFilter.BoxBlur(0.6))).astype(np.float64)
    return blurred / max(float(blurred.mean()), 1e-6)


def make_case(seed: int, label: str, index: int, size: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """One synthetic case: a uint8 grey image and its lesion masks (bool; empty list for ``normal``)."""
    rng = np.random.Generator(np.random.PCG64([seed, DEMO_CLASSES.index(label), index]))
    h, w = (size, size) if index % 3 else (size * 7 // 8, size)
    level = _tissue(rng, h, w)
    masks: list[np.ndarray] = []
    if label != "normal":
        style = STYLES[label]
        n_lesions = 2 if (label == "benign" and index % 5 == 4) else 1
        for _ in range(n_lesions):
            masks.append(_lesion_mask(rng, h, w, style))
        for mask in masks:
            level = np.where(mask, level * style.darkness, level)
            # Posterior effect: rows below the lesion within its horizontal extent.
            cols = mask.any(axis=0)
            bottom = int(np.nonzero(mask.any(axis=1))[0].max())
            below = np.zeros_like(mask)
            below[bottom + 1:, :] = cols[None, :]
            level = np.where(below, level * style.posterior, level)
    image = np.clip(level * _speckle(rng, h, w) * 170.0, 0, 255).astype(np.uint8)
    return image, masks


def _parse_counts(n_per_class: int | tuple[int, ...] | list[int] | dict[str, int]) -> dict[str, int]:
    if isinstance(n_per_class, int):
        counts = dict.fromkeys(DEMO_CLASSES, n_per_class)
    elif isinstance(n_per_class, dict):
        counts = {c: int(n_per_class.get(c, 0)) for c in DEMO_CLASSES}
    else:
        values = list(n_per_class)
        if len(values) != len(DEMO_CLASSES):
            raise M2SNetError(
                f"n_per_class: give one count or {len(DEMO_CLASSES)} (benign, malignant, normal), got {values}"
            )
        counts = dict(zip(DEMO_CLASSES, map(int, values)))
    if any(v < 0 for v in counts.values()) or sum(counts.values()) == 0:
        raise M2SNetError(f"n_per_class: counts must be >= 0 and not all zero, got {counts}")
    return counts


def make_demo_dataset(
    dest: str | os.PathLike,
    n_per_class: int | tuple[int, ...] | list[int] | dict[str, int] = DEFAULT_N_PER_CLASS,
    size: int = DEFAULT_SIZE,
    seed: int = 0,
    overwrite: bool = False,
) -> Path:
    """Write the synthetic set in the BUSI layout (``benign/benign (1).png`` + ``benign (1)_mask.png``).

    Returns ``dest``. Same arguments -> byte-identical files. With ``overwrite`` only a previous
    demo (it holds :data:`DEMO_MARKER`) or an empty folder is replaced.
    """
    if size < 32:
        raise M2SNetError(f"size: must be at least 32 px, got {size}")
    counts = _parse_counts(n_per_class)
    dest = Path(dest)
    with atomic_directory(dest, overwrite=overwrite, marker=DEMO_MARKER) as tmp:
        write_json(tmp / DEMO_MARKER, {"generator": "m2snet data demo", "n_per_class": counts, "seed": seed,
                                       "size": size})
        for label, count in counts.items():
            folder = tmp / label
            folder.mkdir()
            for i in range(1, count + 1):
                image, masks = make_case(seed, label, i, size)
                stem = f"{label} ({i})"
                (folder / f"{stem}.png").write_bytes(encode_png(Image.fromarray(image, mode="L")))
                if not masks:
                    masks = [np.zeros_like(image, dtype=bool)]
                for j, mask in enumerate(masks):
                    suffix = "_mask" if j == 0 else f"_mask_{j}"
                    m8 = mask.astype(np.uint8) * 255
                    # BUSI mixes mask modes; so do we, so the importer is exercised on each.
                    pil = Image.fromarray(m8, mode="L").convert("RGB" if i % 4 == 0 else "1")
                    (folder / f"{stem}{suffix}.png").write_bytes(encode_png(pil))
    log.info("demo dataset: %s in %s (seed %d, %d px)", counts, dest, seed, size)
    return dest


def build_demo_dataset(
    dest: str | os.PathLike,
    n_per_class: int | tuple[int, ...] | list[int] | dict[str, int] = DEFAULT_N_PER_CLASS,
    size: int = DEFAULT_SIZE,
    seed: int = 0,
    overwrite: bool = False,
    progress: bool = False,
):
    """The demo straight into the m2snet format: generate the BUSI layout in a temporary folder and import it.

    This is what ``data/demo`` (tracked by ``data.dvc``) is: with the defaults, the result is
    byte-identical on every machine, so its DVC hash matches ``data.dvc``. Returns the DatasetInfo.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=f".{dest.name}.raw.") as raw:
        make_demo_dataset(Path(raw) / "busi", n_per_class=n_per_class, size=size, seed=seed)
        return import_dataset("busi", Path(raw) / "busi", dest, overwrite=overwrite, progress=progress)
