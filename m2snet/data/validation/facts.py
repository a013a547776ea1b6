"""The facts validation checks, read from the files (never trusted from the manifest): one row per case
(does the image decode, does the mask match its size, which values does it hold, do the bytes still hash
to the manifest's, ...), and the foreground fraction per label with the cases that stand out."""

from __future__ import annotations

from typing import Any

import numpy as np

from m2snet.data.duplicates import CROP_SCALES, NearDuplicateConfig, perceptual_hashes
from m2snet.data.format import DatasetInfo
from m2snet.data.images import ImageError, decode_image
from m2snet.hashing import sha256_file

# A binary mask covering more than this fraction of its image is listed as an outlier.
MAX_FOREGROUND_FRACTION = 0.5


def case_facts(info: DatasetInfo, near: NearDuplicateConfig) -> tuple["Any", np.ndarray]:
    """One row per case of facts read from the files (not trusted from the manifest), and the perceptual hashes."""
    # pandas only when a dataset is validated: importing the data layer (a training run) stays light.
    import pandas as pd

    n_values = max(info.n_classes, 2)
    rows, hashes = [], np.zeros((len(info.cases), len(CROP_SCALES)), dtype=np.uint64)
    for i, case in enumerate(info.cases):
        row: dict[str, Any] = {
            "case_id": case.case_id, "label": case.label,
            "files": (
                f"{case.image_path.relative_to(info.root)}, {case.mask_path.relative_to(info.root)} "
                f"(source: {', '.join((case.source_image, *case.source_masks)) or '?'})"
            ),
            "image_decodes": False, "image_is_rgb": False, "mask_decodes": False, "mask_is_grey": False,
            "mask_size_matches": False, "manifest_size_matches": False, "mask_values_valid": False,
            "sha256_matches": False, "mask_sha256_matches": False, "lesion_area_matches": False,
            "height": -1, "width": -1, "lesion_area": -1, "sha256": case.sha256,
            "foreground_fraction": -1.0,
        }
        try:
            decoded = decode_image(case.image_path, "image")
            im = decoded.image
            row.update(image_decodes=True, image_is_rgb=decoded.source_mode == "RGB", width=im.width,
                       height=im.height)
            row["sha256_matches"] = sha256_file(case.image_path) == case.sha256
            if near.enabled:
                hashes[i] = perceptual_hashes(im)
        except (ImageError, OSError):
            pass
        try:
            decoded = decode_image(case.mask_path, "mask")
            m, grey = decoded.image, decoded.source_mode == "L"
            mask = np.asarray(m)
            row.update(mask_decodes=True, mask_is_grey=grey)
            row["mask_size_matches"] = (m.width, m.height) == (row["width"], row["height"])
            row["mask_values_valid"] = bool(grey and int(mask.max(initial=0)) < n_values)
            row["lesion_area"] = int((mask > 0).sum())
            row["lesion_area_matches"] = row["lesion_area"] == case.lesion_area
            row["mask_sha256_matches"] = sha256_file(case.mask_path) == case.mask_sha256
            row["foreground_fraction"] = row["lesion_area"] / max(mask.size, 1)
        except (ImageError, OSError):
            pass
        row["manifest_size_matches"] = (row["height"], row["width"]) == (case.height, case.width)
        rows.append(row)
    columns = list(rows[0]) if rows else ["case_id", "label", "files", "sha256", "height", "width", "lesion_area"]
    return pd.DataFrame(rows, columns=columns), hashes


def foreground_summary(info: DatasetInfo, df: "Any") -> tuple[dict[str, dict[str, float]], list[dict[str, Any]]]:
    """Foreground fraction per label (min/median/mean/max) and the cases that stand out."""
    stats, outliers = {}, []
    lesion_labels = set(info.meta.get("lesion_labels", []))
    for label, part in sorted(df.groupby("label"), key=lambda kv: str(kv[0])):
        fr = part["foreground_fraction"][part["foreground_fraction"] >= 0]
        if len(fr):
            stats[str(label)] = {
                "n": int(len(fr)), "min": round(float(fr.min()), 4), "median": round(float(fr.median()), 4),
                "mean": round(float(fr.mean()), 4), "max": round(float(fr.max()), 4),
            }
    for row in df.itertuples():
        frac = float(row.foreground_fraction)
        if frac < 0:
            continue
        if info.is_binary and frac > MAX_FOREGROUND_FRACTION:
            outliers.append({"case_id": row.case_id, "label": row.label, "fraction": round(frac, 4),
                             "why": f"mask covers {100 * frac:.0f}% of the image"})
        elif frac == 0 and row.label in lesion_labels:
            outliers.append({"case_id": row.case_id, "label": row.label, "fraction": 0.0,
                             "why": f"empty mask on the lesion label '{row.label}'"})
    return stats, outliers
