"""`m2snet data validate` on a dataset directory: every broken file named, report written, exit code."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from m2snet.cli import app
from m2snet.data.demo import make_demo_dataset
from m2snet.data.importers import import_dataset
from m2snet.data.validation import report_paths, validate_dataset
from m2snet.data.versioning import dataset_version


@pytest.fixture
def ds(tmp_path) -> Path:
    make_demo_dataset(tmp_path / "raw", n_per_class=(3, 2, 2), size=48, seed=2)
    return import_dataset("busi", tmp_path / "raw", tmp_path / "ds", progress=False).root


def test_valid_dataset_report_is_deterministic(ds):
    version = dataset_version(ds)
    report_json, report_html = report_paths(ds)
    assert report_json == ds.parent / "ds.validation.json" and report_html == ds.parent / "ds.validation.html"
    html_before = report_html.read_bytes()
    result = CliRunner().invoke(app, ["data", "validate", str(ds)])
    assert result.exit_code == 0, result.output
    assert "OK: every expectation met" in result.output
    # Re-validating rewrites identical bytes, so a DVC-tracked dataset keeps its hash.
    assert report_html.read_bytes() == html_before and dataset_version(ds) == version
    report = json.loads(report_json.read_text())
    assert report["success"] and report["class_counts"] == {"benign": 3, "malignant": 2, "normal": 2}


def test_every_offending_file_and_expectation_is_listed(ds):
    # 1. a corrupt image; 2. a mask of the wrong size; 3. a non-binary mask; 4. a benign case with no lesion.
    (ds / "images" / "benign_0001.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(ds / "masks" / "benign_0002.png")
    m = np.asarray(Image.open(ds / "masks" / "malignant_0001.png")).copy()
    m[0, 0] = 7
    Image.fromarray(m).save(ds / "masks" / "malignant_0001.png")
    empty = np.zeros_like(np.asarray(Image.open(ds / "masks" / "benign_0003.png")))
    Image.fromarray(empty).save(ds / "masks" / "benign_0003.png")

    result = CliRunner().invoke(app, ["data", "validate", str(ds)])
    assert result.exit_code == 1
    out = result.output
    assert ("FAILED ExpectColumnValuesToBeInSet(image_decodes): every image decodes\n"
            "    benign_0001: images/benign_0001.png") in out
    assert "FAILED ExpectColumnValuesToBeInSet(mask_size_matches)" in out
    assert "benign_0002: images/benign_0002.png, masks/benign_0002.png" in out
    assert "FAILED ExpectColumnValuesToBeInSet(mask_values_valid): masks are binary (0/1)\n    malignant_0001" in out
    lesion_block = out.split("'benign' cases have a lesion\n", 1)[1].split("FAILED", 1)[0]
    assert "benign_0003: images/benign_0003.png" in lesion_block
    report = validate_dataset(ds, write_report=True)
    failing = {(o.column, r["case_id"]) for o in report.failures for r in o.offending}
    assert {("image_decodes", "benign_0001"), ("mask_size_matches", "benign_0002"),
            ("mask_values_valid", "malignant_0001"), ("lesion_area", "benign_0003")} <= failing
    page = report_paths(ds)[1].read_text()
    assert "INVALID" in page and "benign_0003" in page and "malignant_0001" in page


def test_missing_dataset_json_is_a_clear_error(tmp_path):
    result = CliRunner().invoke(app, ["data", "validate", str(tmp_path)])
    assert result.exit_code != 0 and "dataset.json: not found" in str(result.exception)


def test_a_one_pixel_mask_edit_is_caught_by_hash_and_lesion_area(ds):
    """Issue 17.9: the manifest's mask_sha256 and lesion_area are checked against the files."""
    path = ds / "masks" / "benign_0002.png"
    mask = np.asarray(Image.open(path)).copy()
    y, x = np.argwhere(mask == 0)[0]
    mask[y, x] = 1  # still a valid binary mask, one pixel more lesion
    Image.fromarray(mask).save(path)
    report = validate_dataset(ds, write_report=False)
    failing = {(o.column, r["case_id"]) for o in report.failures for r in o.offending}
    assert failing == {("mask_sha256_matches", "benign_0002"), ("lesion_area_matches", "benign_0002")}
    rules = {o.column: o.rule for o in report.failures}
    assert rules["mask_sha256_matches"] == "mask bytes match the manifest mask_sha256"
    assert rules["lesion_area_matches"] == "lesion area (mask pixels > 0) matches the manifest lesion_area"


@pytest.mark.parametrize("bad_path", ["../outside/x.png", "images/../../outside/x.png", "/tmp/x.png"])
def test_a_manifest_path_outside_the_dataset_is_refused(ds, bad_path):
    """Issue 17.9: a path escaping the dataset root is not covered by its version: refused, naming row and path."""
    import csv

    from m2snet.data.format import load_dataset
    from m2snet.errors import M2SNetError

    outside = ds.parent / "outside"
    outside.mkdir(exist_ok=True)
    (outside / "x.png").write_bytes((ds / "images" / "benign_0001.png").read_bytes())
    rows = list(csv.DictReader((ds / "manifest.csv").open()))
    rows[1]["image"] = bad_path
    with (ds / "manifest.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    with pytest.raises(M2SNetError) as err:
        load_dataset(ds)
    message = str(err.value)
    assert "manifest.csv:3" in message and repr(bad_path) in message and "image" in message
    result = CliRunner().invoke(app, ["data", "validate", str(ds)])  # main() prints it as one line, exit 2
    assert isinstance(result.exception, M2SNetError) and "outside the dataset" in str(result.exception)
