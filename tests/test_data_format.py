"""Demo generation, BUSI import of the demo, the format's reader, the torch Dataset and the cache."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from m2snet.data.demo import make_demo_dataset
from m2snet.data.format import MANIFEST_COLUMNS, load_dataset, safe_case_id
from m2snet.data.importers import import_dataset
from m2snet.errors import M2SNetError


@pytest.fixture(scope="module")
def demo_dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("demo")
    make_demo_dataset(root / "raw", n_per_class=(5, 4, 3), size=64, seed=3)
    import_dataset("busi", root / "raw", root / "ds", progress=False)
    return root / "ds"


def _tree_bytes(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_demo_is_byte_identical_for_a_seed_and_differs_across_seeds(tmp_path):
    make_demo_dataset(tmp_path / "a", n_per_class=(3, 2, 2), size=48, seed=7)
    make_demo_dataset(tmp_path / "b", n_per_class=(3, 2, 2), size=48, seed=7)
    make_demo_dataset(tmp_path / "c", n_per_class=(3, 2, 2), size=48, seed=8)
    a, b, c = _tree_bytes(tmp_path / "a"), _tree_bytes(tmp_path / "b"), _tree_bytes(tmp_path / "c")
    assert a == b
    assert a.keys() == c.keys() and a != c
    # BUSI layout and names, including a second mask file for some benign cases (index % 5 == 4).
    assert "benign/benign (1).png" in a and "benign/benign (1)_mask.png" in a
    assert "normal/normal (2)_mask.png" in a
    make_demo_dataset(tmp_path / "d", n_per_class=(5, 1, 1), size=48, seed=7)
    assert "benign/benign (4)_mask_1.png" in _tree_bytes(tmp_path / "d")


def test_demo_images_look_like_the_classes(tmp_path):
    make_demo_dataset(tmp_path / "raw", n_per_class=2, size=64, seed=0)
    for label in ("benign", "malignant"):
        image = np.asarray(Image.open(tmp_path / "raw" / label / f"{label} (1).png"), dtype=float)
        mask = np.asarray(Image.open(tmp_path / "raw" / label / f"{label} (1)_mask.png").convert("L")) > 0
        assert 0.01 < mask.mean() < 0.5
        assert image[mask].mean() < 0.7 * image[~mask].mean()  # hypoechoic lesion
    normal = np.asarray(Image.open(tmp_path / "raw" / "normal" / "normal (1)_mask.png").convert("L"))
    assert normal.max() == 0


def test_import_writes_the_documented_format(demo_dataset):
    meta = json.loads((demo_dataset / "dataset.json").read_text())
    assert meta["format_version"] == 2 and meta["n_classes"] == 1 and meta["source_format"] == "busi"
    # Only facts about the data: the name and the writer's version would change the dataset version.
    assert "name" not in meta and "created_by" not in meta
    assert meta["near_duplicates"] == {"method": "phash64-centre-crops", "max_distance": 8, "hash_bits": 64,
                                       "linkage": "complete"}
    assert meta["labels"] == ["benign", "malignant", "normal"] and meta["mask_classes"] == ["background", "lesion"]
    with open(demo_dataset / "manifest.csv") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == MANIFEST_COLUMNS
        rows = list(reader)
    assert len(rows) == 12
    row = next(r for r in rows if r["case_id"] == "benign_0004")
    assert row["group"] == "benign_0004" and row["subset"] == ""  # a distinct image is its own cluster
    assert row["source_image"] == "benign/benign (4).png"
    assert row["source_masks"] == "benign/benign (4)_mask.png;benign/benign (4)_mask_1.png"
    image = Image.open(demo_dataset / row["image"])
    mask = Image.open(demo_dataset / row["mask"])
    assert image.mode == "RGB" and mask.mode == "L" and image.size == mask.size
    values = np.asarray(mask)
    assert set(np.unique(values)) <= {0, 1} and int(row["lesion_area"]) == int(values.sum())
    # Union of the two source masks.
    m0 = np.asarray(Image.open(demo_dataset.parent / "raw/benign/benign (4)_mask.png").convert("L")) > 0
    m1 = np.asarray(Image.open(demo_dataset.parent / "raw/benign/benign (4)_mask_1.png").convert("L")) > 0
    assert np.array_equal(values > 0, m0 | m1) and (m1 & ~m0).any()


def test_load_dataset_and_version(demo_dataset, tmp_path):
    info = load_dataset(demo_dataset)
    assert {c.label for c in info.cases} == {"benign", "malignant", "normal"}
    case = info.case("malignant_0002")
    assert case.image_path.is_file() and case.lesion_area > 0 and case.height > 0
    assert info.version.endswith(".dir") and len(info.version) == 36
    with pytest.raises(M2SNetError, match="dataset.json"):
        load_dataset(tmp_path)


def test_same_seed_gives_same_dataset_version(tmp_path, demo_dataset):
    make_demo_dataset(tmp_path / "raw", n_per_class=(5, 4, 3), size=64, seed=3)
    info = import_dataset("busi", tmp_path / "raw", tmp_path / "elsewhere" / "ds", progress=False)
    assert info.version == load_dataset(demo_dataset).version


def test_safe_case_id():
    assert safe_case_id("benign", "benign (12)") == "benign_0012"
    assert safe_case_id("CVC-300", "149") == "CVC-300_0149"
    assert safe_case_id("cju0qkwl35piu0993l0dewei2") == "cju0qkwl35piu0993l0dewei2"


def test_segmentation_dataset_items(demo_dataset):
    from m2snet.data.dataset import SegmentationDataset
    from m2snet.models.preprocessing import DEFAULT_NORMALIZATION as NORM

    ds = SegmentationDataset(demo_dataset, ["benign_0001", "normal_0001"], size=32, augment=False, normalization=NORM)
    assert len(ds) == 2
    item = ds[0]
    assert item["case_id"] == "benign_0001"
    assert item["image"].shape == (3, 32, 32) and item["image"].dtype == torch.float32
    assert item["mask"].shape == (1, 32, 32) and item["mask"].dtype == torch.float32
    assert set(item["mask"].unique().tolist()) == {0.0, 1.0}
    assert ds[1]["mask"].sum() == 0
    # Normalisation: undoing it gives back 0..255 pixel values.
    raw = item["image"] * torch.tensor(NORM.std).view(3, 1, 1) + torch.tensor(NORM.mean).view(3, 1, 1)
    assert raw.min() >= -1e-3 and raw.max() <= 255 + 1e-3
    torch.manual_seed(0)
    aug = SegmentationDataset(demo_dataset, ["benign_0001"], size=32, augment=True, normalization=NORM)
    outs = [aug[0] for _ in range(6)]
    assert any(not torch.equal(o["image"], item["image"]) for o in outs)
    for o in outs:  # the mask stays binary after rotation
        assert set(o["mask"].unique().tolist()) <= {0.0, 1.0}


def test_cache_matches_direct_decoding(demo_dataset, tmp_path):
    from m2snet.data.cache import cache_path
    from m2snet.data.dataset import SegmentationDataset
    from m2snet.models.preprocessing import DEFAULT_NORMALIZATION as NORM

    ids = ["benign_0002", "malignant_0001", "normal_0003"]
    direct = SegmentationDataset(demo_dataset, ids, size=40, normalization=NORM)
    cached = SegmentationDataset(demo_dataset, ids, size=40, cache_dir=tmp_path / "cache", normalization=NORM)
    for i in range(len(ids)):
        a, b = direct[i], cached[i]
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["mask"], b["mask"])
    path = cache_path(direct.info, 40, tmp_path / "cache")
    assert (path / "images.npy").is_file() and np.load(path / "images.npy", mmap_mode="r").shape == (12, 40, 40, 3)
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".partial")]


@pytest.mark.parametrize("value", ["one", [1], -3, 0, 1.5, True, None])
def test_dataset_json_with_a_bad_n_classes_is_refused_naming_the_file(demo_dataset, tmp_path, value):
    """Issues 29.7 and 29.9: ``n_classes: "one"`` or a list was a traceback, ``-3`` validated as OK."""
    import shutil

    ds = tmp_path / "ds"
    shutil.copytree(demo_dataset, ds)
    meta = json.loads((ds / "dataset.json").read_text())
    meta["n_classes"] = value
    (ds / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(M2SNetError, match=rf"{ds / 'dataset.json'}: n_classes .* must be a whole number >= 1"):
        load_dataset(ds)
    # `m2snet data validate`: the same, one line, exit 2 (not "OK: every expectation met").
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "m2snet.cli", "data", "validate", str(ds)], capture_output=True,
                          text=True, timeout=120)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), proc.stderr + proc.stdout
    assert str(ds / "dataset.json") in lines[0] and "n_classes" in lines[0]
