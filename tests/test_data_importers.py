"""Each importer on a tiny synthetic tree in its layout, and every way an import must fail cleanly."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from m2snet.data.format import load_dataset
from m2snet.data.importers import import_dataset, list_importers
from m2snet.errors import M2SNetError

H, W = 40, 48


def _image(seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (H, W, 3), dtype=np.uint8), "RGB")


def _mask(seed: int, value: int = 255) -> np.ndarray:
    m = np.zeros((H, W), np.uint8)
    y, x = 5 + seed % 10, 6 + seed % 12
    m[y:y + 12, x:x + 15] = value
    return m


def _save(path: Path, img, **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    (img if isinstance(img, Image.Image) else Image.fromarray(img)).save(path, **kw)
    return path


def _busi(root: Path) -> Path:
    for i in (1, 2, 3):
        _save(root / "benign" / f"benign ({i}).png", _image(i).convert("L"))
        _save(root / "benign" / f"benign ({i})_mask.png", Image.fromarray(_mask(i)).convert("1"))
    _save(root / "benign" / "benign (2)_mask_1.png", Image.fromarray(np.flipud(_mask(9))).convert("RGBA"))
    for i in (1, 2):
        _save(root / "malignant" / f"malignant ({i}).png", _image(10 + i))
        _save(root / "malignant" / f"malignant ({i})_mask.png", Image.fromarray(_mask(i)).convert("RGB"))
    _save(root / "normal" / "normal (1).png", _image(20).convert("L"))
    _save(root / "normal" / "normal (1)_mask.png", np.zeros((H, W), np.uint8))
    return root


def _jpeg_mask(m: np.ndarray) -> Image.Image:
    return Image.fromarray(m).convert("RGB")


def test_registry_lists_every_layout():
    assert set(list_importers()) >= {"busi", "kvasir", "pranet", "cvc-clinicdb", "covid-ct", "goals", "folder"}


def test_busi_masks_of_every_mode_are_merged(tmp_path):
    info = import_dataset("busi", _busi(tmp_path / "src"), tmp_path / "out", progress=False)
    assert [c.case_id for c in info.cases] == ["benign_0001", "benign_0002", "benign_0003", "malignant_0001",
                                               "malignant_0002", "normal_0001"]
    case = info.case("benign_0002")
    mask = np.asarray(Image.open(case.mask_path))
    expected = (_mask(2) > 0) | (np.flipud(_mask(9)) > 0)
    assert np.array_equal(mask, expected.astype(np.uint8))
    assert case.source_masks == ("benign/benign (2)_mask.png", "benign/benign (2)_mask_1.png")
    assert info.case("malignant_0001").lesion_area == int((_mask(1) > 0).sum())
    assert info.case("normal_0001").lesion_area == 0
    assert Image.open(info.case("benign_0001").image_path).mode == "RGB"


def test_kvasir_jpeg_masks_are_thresholded(tmp_path):
    src = tmp_path / "kvasir"
    for i in range(3):
        _save(src / "images" / f"cju{i}abc.jpg", _image(i), quality=90)
        _save(src / "masks" / f"cju{i}abc.jpg", _jpeg_mask(_mask(i)), quality=75)
    info = import_dataset("kvasir", src, tmp_path / "out", progress=False)
    assert len(info.cases) == 3 and {c.label for c in info.cases} == {"polyp"}
    raw = np.asarray(Image.open(src / "masks" / "cju0abc.jpg").convert("L"))
    assert len(np.unique(raw)) > 2  # the JPEG really is noisy ...
    out = np.asarray(Image.open(info.case("cju0abc").mask_path))
    assert set(np.unique(out)) == {0, 1}  # ... and the import is binary
    assert abs(int(out.sum()) - int((_mask(0) > 0).sum())) < 20


def test_pranet_subsets_are_recorded(tmp_path):
    src = tmp_path / "pranet"
    for k, (folder, n) in enumerate((("TrainDataset", 2), ("TestDataset/CVC-300", 1), ("TestDataset/Kvasir", 2))):
        for i in range(n):
            _save(src / folder / "images" / f"{i + 1}.png", _image(10 * k + i))
            _save(src / folder / "masks" / f"{i + 1}.png", _mask(i))
    info = import_dataset("pranet", src, tmp_path / "out", progress=False)
    subsets = sorted({(c.subset, c.case_id) for c in info.cases})
    assert subsets == [("CVC-300", "CVC-300_0001"), ("Kvasir", "Kvasir_0001"), ("Kvasir", "Kvasir_0002"),
                       ("train", "train_0001"), ("train", "train_0002")]
    # Distinct images: each case is its own duplicate cluster.
    assert all(c.group == c.case_id for c in info.cases)


def test_cvc_clinicdb_reads_tiff(tmp_path):
    import tifffile

    src = tmp_path / "clinic"
    (src / "Original").mkdir(parents=True)
    (src / "Ground Truth").mkdir()
    for i in range(2):
        tifffile.imwrite(src / "Original" / f"{i + 1}.tif", np.asarray(_image(i)))
        tifffile.imwrite(src / "Ground Truth" / f"{i + 1}.tif", _mask(i))
    info = import_dataset("cvc-clinicdb", src, tmp_path / "out", progress=False)
    assert [c.case_id for c in info.cases] == ["clinicdb_0001", "clinicdb_0002"]
    assert np.array_equal(np.asarray(Image.open(info.cases[0].image_path)), np.asarray(_image(0)))


def test_covid_ct_allows_slices_without_infection(tmp_path):
    src = tmp_path / "covid"
    _save(src / "Imgs" / "a.jpg", _image(0))
    _save(src / "GT" / "a.png", _mask(0))
    _save(src / "Imgs" / "b.jpg", _image(1))
    _save(src / "GT" / "b.png", np.zeros((H, W), np.uint8))
    info = import_dataset("covid-ct", src, tmp_path / "out", progress=False)
    assert sorted(c.lesion_area > 0 for c in info.cases) == [False, True]


def test_goals_layers_map_to_classes(tmp_path):
    src = tmp_path / "goals" / "Train"
    layers = np.full((H, W), 255, np.uint8)
    layers[5:10], layers[10:15], layers[20:30] = 0, 80, 160
    _save(src / "Image" / "0001.png", _image(0).convert("L"))
    _save(src / "Layer_Masks" / "0001.png", layers)
    info = import_dataset("goals", tmp_path / "goals", tmp_path / "out", progress=False)
    assert info.n_classes == 4 and info.mask_classes == ["background", "RNFL", "GCIPL", "choroid"]
    out = np.asarray(Image.open(info.cases[0].mask_path))
    assert out[0, 0] == 0 and out[7, 0] == 1 and out[12, 0] == 2 and out[25, 0] == 3
    bad = layers.copy()
    bad[40 - 1, 0] = 100
    _save(src / "Layer_Masks" / "0001.png", bad)
    with pytest.raises(M2SNetError, match=r"0001.png: layer mask has grey levels \[100\]"):
        import_dataset("goals", tmp_path / "goals", tmp_path / "out2", progress=False)
    assert not (tmp_path / "out2").exists()


def test_folder_with_suffix_and_threshold(tmp_path):
    src = tmp_path / "generic"
    for i in range(2):
        _save(src / "img" / f"case{i}.png", _image(i))
        _save(src / "img" / f"case{i}_seg.png", _mask(i, value=200))
    info = import_dataset(
        "folder", src, tmp_path / "out", progress=False,
        options={"images_dir": "img", "masks_dir": "img", "mask_suffix": "_seg", "threshold": 100, "label": "tumour"},
    )
    assert [c.case_id for c in info.cases] == ["case0", "case1"] and info.cases[0].label == "tumour"
    with pytest.raises(M2SNetError, match="has no option"):
        import_dataset("folder", src, tmp_path / "out2", options={"colour": 1})


# ---------------------------------------------------------------- failures: clear message, nothing left


def _leftovers(parent: Path, name: str) -> list[Path]:
    return [p for p in parent.iterdir() if p.name == name or p.name.startswith(f".{name}.")]


@pytest.mark.parametrize("breakage, message", [
    ("corrupt_image", r"benign \(1\)\.png: cannot decode image"),
    ("missing_mask", r"malignant \(2\)\.png: no mask found"),
    ("wrong_size", r"benign \(3\)_mask\.png: mask is 20x20 but its image benign \(3\)\.png is 48x40"),
    ("non_binary", r"malignant \(1\)_mask\.png: mask is not binary \(values 0, 128, 255\)"),
    ("normal_with_lesion", r"'normal' cases have an empty mask\n.*normal_0001"),
    ("empty", r"no BUSI class folders found"),
])
def test_bad_sources_fail_naming_the_file_and_leave_nothing(tmp_path, breakage, message):
    src = _busi(tmp_path / "src")
    if breakage == "corrupt_image":
        (src / "benign" / "benign (1).png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    elif breakage == "missing_mask":
        (src / "malignant" / "malignant (2)_mask.png").unlink()
    elif breakage == "wrong_size":
        _save(src / "benign" / "benign (3)_mask.png", np.zeros((20, 20), np.uint8))
    elif breakage == "non_binary":
        m = _mask(1)
        m[0, 0] = 128
        _save(src / "malignant" / "malignant (1)_mask.png", m)
    elif breakage == "normal_with_lesion":
        _save(src / "normal" / "normal (1)_mask.png", _mask(3))
    elif breakage == "empty":
        src = tmp_path / "empty"
        src.mkdir()
    with pytest.raises(M2SNetError, match=message):
        import_dataset("busi", src, tmp_path / "out", progress=False)
    assert _leftovers(tmp_path, "out") == []


def test_all_problems_are_reported_together(tmp_path):
    src = _busi(tmp_path / "src")
    (src / "benign" / "benign (1).png").write_bytes(b"not an image")
    (src / "malignant" / "malignant (2)_mask.png").unlink()
    with pytest.raises(M2SNetError, match="2 of 6 cases") as err:
        import_dataset("busi", src, tmp_path / "out", progress=False)
    assert "benign (1).png" in str(err.value) and "malignant (2).png" in str(err.value)


def test_duplicates_policy(tmp_path):
    src = _busi(tmp_path / "src")
    _save(src / "malignant" / "malignant (2).png", _image(1).convert("L"))  # same pixels as benign (1)
    info = import_dataset("busi", src, tmp_path / "out", progress=False)
    assert info.meta["allow_duplicates"] is True
    assert info.case("benign_0001").sha256 == info.case("malignant_0002").sha256
    with pytest.raises(M2SNetError, match=r"no two cases have the same image bytes\n.*benign_0001.*\n.*malignant_0002"):
        import_dataset("busi", src, tmp_path / "strict", allow_duplicates=False, progress=False)
    assert _leftovers(tmp_path, "strict") == []


def test_cli_import_json_and_errors(tmp_path):
    import json

    from m2snet.cli import app

    src = _busi(tmp_path / "src")
    runner = CliRunner()
    result = runner.invoke(app, ["data", "import", "--format", "busi", str(src), str(tmp_path / "out"), "--json"])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout[result.stdout.index("{"):])
    assert payload["n_cases"] == 6 and payload["class_counts"] == {"benign": 3, "malignant": 2, "normal": 1}
    assert payload["version"] == load_dataset(tmp_path / "out").version
    # A second import onto a non-empty DEST refuses; --overwrite replaces.
    again = runner.invoke(app, ["data", "import", "-f", "busi", str(src), str(tmp_path / "out")])
    assert again.exit_code != 0 and "already exists" in str(again.exception)
    overwrite = runner.invoke(app, ["data", "import", "-f", "busi", str(src), str(tmp_path / "out"), "--overwrite"])
    assert overwrite.exit_code == 0


# ---------------------------------------------------------------- high bit depth and oversized images


def _to_16bit(img: Image.Image) -> Image.Image:
    """The 8-bit grey image stored at 16 bits the way converters do it (v * 257: full 16-bit range)."""
    return Image.fromarray(np.asarray(img.convert("L")).astype(np.uint16) * 257)


def test_16bit_images_and_masks_are_scaled_to_8bit_not_saturated(tmp_path):
    """A 16-bit source holding an 8-bit picture imports pixel-exact (the 8-bit picture), not 99% white."""
    src = _busi(tmp_path / "src")
    _save(src / "benign" / "benign (1).png", _to_16bit(_image(1)))
    _save(src / "benign" / "benign (1)_mask.png", _mask(1).astype(np.uint16) * 257)  # 0 / 65535
    info = import_dataset("busi", src, tmp_path / "out", progress=False)
    got = np.asarray(Image.open(info.case("benign_0001").image_path))
    assert got.dtype == np.uint8 and np.array_equal(got[..., 0], np.asarray(_image(1).convert("L")))
    mask = np.asarray(Image.open(info.case("benign_0001").mask_path))
    assert np.array_equal(mask, (_mask(1) > 0).astype(np.uint8))


def test_16bit_files_that_do_not_use_the_16bit_range_are_refused_naming_the_file(tmp_path):
    """8-bit data in a 16-bit file (values < 4096) would scale to a few grey levels: refused, not guessed;
    a 16-bit mask with labels above 255 that are not two-level is refused too (labels, not intensities)."""
    src = _busi(tmp_path / "src")
    _save(src / "benign" / "benign (1).png", np.asarray(_image(1).convert("L")).astype(np.uint16))
    labels = _mask(2).astype(np.uint16)
    labels[labels > 0] = 300
    labels[0, 0] = 600
    _save(src / "benign" / "benign (2)_mask.png", labels)
    with pytest.raises(M2SNetError) as err:
        import_dataset("busi", src, tmp_path / "out", progress=False)
    text = str(err.value)
    assert re.search(r"benign \(1\)\.png: 16-bit image uses only values \d+\.\.\d+", text)
    assert "benign (2)_mask.png: 16-bit mask has values 0, 300, 600" in text
    assert _leftovers(tmp_path, "out") == []


def test_an_image_above_the_pixel_limit_is_refused_from_its_header(tmp_path, monkeypatch):
    """M2SNET_MAX_PIXELS caps what is decoded (checked from the header); PIL's own bomb error is the same error."""
    from PIL import Image as PILImage

    src = _busi(tmp_path / "src")
    monkeypatch.setenv("M2SNET_MAX_PIXELS", str(H * W - 1))
    with pytest.raises(M2SNetError, match=r"benign \(1\)\.png: image is 48x40 = 1920 pixels, above the limit of "
                                          r"1919 \(M2SNET_MAX_PIXELS\)"):
        import_dataset("busi", src, tmp_path / "out", progress=False)
    monkeypatch.delenv("M2SNET_MAX_PIXELS")
    monkeypatch.setattr(PILImage, "MAX_IMAGE_PIXELS", 100)  # PIL raises DecompressionBombError above 200
    with pytest.raises(M2SNetError, match=r"benign \(1\)\.png: image is too large to decode"):
        import_dataset("busi", src, tmp_path / "out", progress=False)
    assert _leftovers(tmp_path, "out") == []


def test_importer_options_of_the_wrong_type_are_refused(tmp_path):
    from m2snet.data.importers import get_importer

    with pytest.raises(M2SNetError, match=r"format 'busi': option threshold='abc' is not a valid int"):
        get_importer("busi", threshold="abc")
    assert get_importer("folder", threshold=127, mask_suffix="_1").threshold == 127


def test_endoscopy_formats_default_to_a_tighter_near_duplicate_threshold(tmp_path):
    """Issue 17.5: endoscopy frames share their black corners and overlay box, so different polyps sit
    4-8 bits apart (Kvasir-SEG, checked by eye): kvasir, pranet and cvc-clinicdb default to 4 bits,
    BUSI keeps the 8 it was calibrated on; --near-duplicate-threshold overrides either."""
    from m2snet.cli import app
    from m2snet.data.importers import get_importer

    assert [get_importer(f).near_duplicate_threshold for f in ("kvasir", "pranet", "cvc-clinicdb", "busi")] == [
        4, 4, 4, 8]
    src = tmp_path / "kvasir"
    for i in range(3):
        _save(src / "images" / f"k{i}.jpg", _image(i))
        _save(src / "masks" / f"k{i}.jpg", _jpeg_mask(_mask(i)))
    info = import_dataset("kvasir", src, tmp_path / "out", progress=False)
    assert info.meta["near_duplicates"]["max_distance"] == 4
    result = CliRunner().invoke(app, ["data", "import", "-f", "kvasir", str(src), str(tmp_path / "on"),
                                      "--near-duplicates", "on"])
    assert result.exit_code == 0, result.output
    assert load_dataset(tmp_path / "on").meta["near_duplicates"]["max_distance"] == 4
