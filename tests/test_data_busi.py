"""The real BUSI set (../shared/data/busi), imported end to end: counts, merged masks, validation, duplicates."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
from PIL import Image

from m2snet.data.format import load_dataset
from m2snet.data.importers import import_dataset
from m2snet.data.validation import report_paths


def _union_of_source_masks(paths) -> np.ndarray:
    masks = [np.asarray(Image.open(p).convert("L")) > 0 for p in paths]
    return np.logical_or.reduce(masks)


def test_busi_import_counts_merges_validates_and_reports_duplicates(busi_root, tmp_path):
    dest = tmp_path / "busi"
    info = import_dataset("busi", busi_root, dest, progress=False)

    assert len(info.cases) == 780
    assert Counter(c.label for c in info.cases) == {"benign": 437, "malignant": 210, "normal": 133}

    # Every case with extra _mask_1/_mask_2 files holds the union of all its source masks.
    multi = [c for c in info.cases if len(c.source_masks) > 1]
    expected_multi = sorted(p.name.replace("_mask_1.png", "") for p in busi_root.glob("*/*_mask_1.png"))
    assert len(multi) == len(expected_multi) > 0
    for case in multi:
        union = _union_of_source_masks(busi_root / s for s in case.source_masks)
        merged = np.asarray(Image.open(case.mask_path)) > 0
        assert merged.shape == union.shape and np.array_equal(merged, union), case.case_id

    # Normal cases have empty masks, lesion cases do not (validation enforces it; check the data too).
    assert all((c.lesion_area == 0) == (c.label == "normal") for c in info.cases)

    report_json, report_html = report_paths(dest)
    report = json.loads(report_json.read_text())
    assert report["success"] is True
    assert report["duplicates"] == [["benign_0433", "malignant_0145"]]
    assert "benign_0433" in report_html.read_text()

    # Near duplicates (measured in bench/busi_near_duplicates.py): the known twins share a group,
    # the byte-identical pair under two labels is one of the 8 label conflicts (warnings for BUSI).
    clusters = report["duplicate_clusters"]
    # Complete linkage (issue 17.5): the chain of 7 is cut, every cluster within 8 bits pairwise.
    assert (clusters["duplicate_clusters"], clusters["cases_in_clusters"], clusters["label_conflicts"]) == (148, 327, 8)
    assert clusters["largest_cluster"] == 4 and clusters["near_pairs_across_clusters"] == 4
    assert info.case("benign_0001").group == info.case("benign_0318").group == "benign_0001"
    assert info.case("benign_0433").group == info.case("malignant_0145").group == "benign_0433"
    assert ["benign_0433", "malignant_0145"] in [c["case_ids"] for c in report["label_conflicts"]]
    assert set(report["foreground_fraction"]) == {"benign", "malignant", "normal"}
    assert load_dataset(dest).version == info.version
