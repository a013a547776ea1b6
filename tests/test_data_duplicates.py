"""Near-duplicate clusters (issue 8): planted resized, cropped and re-encoded copies are found, one
under another label is a label conflict, unrelated images stay apart; options and outputs."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from m2snet.cli import app
from m2snet.data.demo import make_demo_dataset
from m2snet.data.duplicates import NearDuplicateConfig, find_duplicates, near_pairs, perceptual_hashes
from m2snet.data.format import load_dataset
from m2snet.data.importers import import_dataset
from m2snet.data.validation import report_paths, validate_dataset
from m2snet.errors import M2SNetError


def _jpeg(im: Image.Image, quality: int = 70) -> Image.Image:
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=quality)
    buf.seek(0)
    return Image.open(buf).convert("L")


def _copy_as(src: Path, image: Image.Image, label: str, index: int, mask: np.ndarray | None = None) -> None:
    image.save(src / label / f"{label} ({index}).png")
    if mask is None:
        mask = np.zeros((image.height, image.width), np.uint8)
        mask[image.height // 3:image.height // 2, image.width // 3:image.width // 2] = 255
    Image.fromarray(mask).save(src / label / f"{label} ({index})_mask.png")


@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> Path:
    """The demo (distinct images) plus planted copies of benign (1), benign (2) and malignant (1)."""
    src = tmp_path_factory.mktemp("planted") / "src"
    make_demo_dataset(src, n_per_class=(6, 4, 3), size=96, seed=11)
    b1 = Image.open(src / "benign" / "benign (1).png")
    b2 = Image.open(src / "benign" / "benign (2).png")
    m1 = Image.open(src / "malignant" / "malignant (1).png")
    w, h = b1.size
    _copy_as(src, b1.resize((int(w * 0.7), int(h * 0.7)), Image.BILINEAR), "benign", 7)  # resized
    _copy_as(src, b1.crop((6, 2, w - 1, h - 5)), "benign", 8)  # cropped unevenly, 1-6% per side
    _copy_as(src, _jpeg(b2), "benign", 9)  # re-encoded
    other_label = _jpeg(m1.resize((80, 80), Image.BILINEAR), 80)
    _copy_as(src, other_label, "normal", 4, np.zeros((80, 80), np.uint8))
    return src


EXPECTED_CLUSTERS = [
    ["benign_0001", "benign_0007", "benign_0008"],
    ["benign_0002", "benign_0009"],
    ["malignant_0001", "normal_0004"],
]


def test_planted_near_duplicates_are_clustered(planted, tmp_path):
    info = import_dataset("busi", planted, tmp_path / "ds", progress=False)
    clusters = {}
    for case in info.cases:
        clusters.setdefault(case.group, []).append(case.case_id)
    multi = sorted(sorted(ids) for ids in clusters.values() if len(ids) > 1)
    assert multi == EXPECTED_CLUSTERS
    # The group is the smallest case id; singletons are their own group.
    assert all(case.group == min(clusters[case.group]) for case in info.cases)
    assert info.case("benign_0003").group == "benign_0003"
    report = json.loads(report_paths(info.root)[0].read_text())["duplicate_clusters"]
    assert report["duplicate_clusters"] == 3 and report["near_duplicate_clusters"] == 3
    assert report["cases_in_clusters"] == 7 and report["exact_duplicate_groups"] == 0
    conflict = [c for c in report["clusters"] if c["label_conflict"]]
    assert [c["case_ids"] for c in conflict] == [["malignant_0001", "normal_0004"]]
    link = conflict[0]["links"][0]
    assert link["kind"] == "near" and link["similarity"] == 1 - link["bits"] / 64 and link["bits"] <= 8
    page = report_paths(info.root)[1].read_text()
    assert "label conflict (allowed)" in page and "normal_0004" in page


def test_near_duplicates_off_and_threshold(planted, tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, ["data", "import", "-f", "busi", str(planted), str(tmp_path / "off"),
                                 "--near-duplicates", "off", "--json"])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout[result.stdout.index("{"):])
    assert payload["near_duplicates"] is None and payload["duplicate_counts"]["duplicate_clusters"] == 0
    assert all(c.group == c.case_id for c in load_dataset(tmp_path / "off").cases)
    # Validating the 'off' dataset with near duplicates on reports the clusters without failing the
    # group check (the manifest was made with other settings).
    result = runner.invoke(app, ["data", "validate", str(tmp_path / "off"), "--near-duplicate-threshold", "8",
                                 "--json"])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout[result.stdout.index("{"):])
    counts = payload["duplicate_counts"]
    assert counts["duplicate_clusters"] == 3 and counts["label_conflicts"] == 1
    # Threshold 0: only identical hashes; the unevenly cropped copy falls out, the resized one stays.
    result = runner.invoke(app, ["data", "import", "-f", "busi", str(planted), str(tmp_path / "t0"),
                                 "--near-duplicate-threshold", "0"])
    assert result.exit_code == 0, result.output
    t0 = load_dataset(tmp_path / "t0")
    assert t0.case("benign_0008").group == "benign_0008" and t0.case("benign_0007").group == "benign_0001"
    bad = runner.invoke(app, ["data", "import", "-f", "busi", str(planted), str(tmp_path / "x"),
                              "--near-duplicates", "maybe"])
    assert bad.exit_code != 0 and "expected on or off" in str(bad.exception)


def test_edited_images_make_the_recorded_groups_stale(planted, tmp_path):
    info = import_dataset("busi", planted, tmp_path / "ds", progress=False)
    # Overwrite benign_0007's image with an unrelated one and fix its sha256 in the manifest.
    from m2snet.hashing import sha256_file

    Image.open(info.case("normal_0001").image_path).save(info.case("benign_0007").image_path)
    edited = info.case("benign_0007")
    manifest = (info.root / "manifest.csv").read_text().replace(edited.sha256, sha256_file(edited.image_path))
    (info.root / "manifest.csv").write_text(manifest)
    report = validate_dataset(info.root, write_report=False)
    failing = {(o.column, r["case_id"]) for o in report.failures for r in o.offending}
    assert ("group_matches", "benign_0007") in failing


def _chain(n: int, step: int = 2) -> np.ndarray:
    """uint64 [n, 3]: hash k differs from hash 0 in its first ``step * k`` bits, so d(i, j) = step * |i - j|."""
    base = np.uint64(0x5A5A_5A5A_5A5A_5A5A)
    rows = [base ^ np.uint64((1 << (step * k)) - 1) for k in range(n)]
    return np.repeat(np.array(rows, dtype=np.uint64)[:, None], 3, axis=1)


def _diameter(ids: list[str], hashes: np.ndarray, members: list[str]) -> int:
    idx = [ids.index(m) for m in members]
    return max(int(np.bitwise_count(hashes[i, 0] ^ hashes[j, 0])) for i in idx for j in idx)


def test_clusters_have_a_bounded_diameter_not_a_chain():
    """Issue 17.5: 20 images, each 2 bits from the next, are one chain of 38 bits. Union-find made them
    one cluster; every cluster must instead have all its members within the threshold of each other."""
    hashes = _chain(20)
    ids = [f"c{k:02d}" for k in range(20)]
    report = find_duplicates(ids, ["x"] * 20, [f"s{k}" for k in range(20)], hashes, NearDuplicateConfig(max_distance=8))
    assert report.clusters and max(len(c.case_ids) for c in report.clusters) <= 5
    # 19 neighbouring pairs of 2 bits, 18 of 4, 17 of 6, 16 of 8: the bound leaves some in two clusters.
    assert 0 < report.counts()["near_pairs_across_clusters"] < 19 + 18 + 17 + 16
    for cluster in report.clusters:
        assert _diameter(ids, hashes, cluster.case_ids) <= 8, cluster.case_ids
    # Each case is in exactly one cluster and its group is that cluster's smallest id.
    assert all(report.group_of[c] == cl.group == cl.case_ids[0] for cl in report.clusters for c in cl.case_ids)
    # The result does not depend on the order the cases are listed in (import order vs manifest order).
    order = np.random.default_rng(0).permutation(20)
    shuffled = find_duplicates([ids[k] for k in order], ["x"] * 20, [f"s{k}" for k in order], hashes[order],
                               NearDuplicateConfig(max_distance=8))
    assert shuffled.group_of == report.group_of


def test_exact_duplicates_stay_together_and_conflicts_are_found():
    rng = np.random.default_rng(0)
    hashes = rng.integers(0, 2**63, size=(6, 3), dtype=np.uint64)
    hashes[1] = hashes[0] ^ np.uint64(0b11)  # a: 2 bits from c
    hashes[2] = hashes[1] ^ np.uint64(0b1100)  # b: 2 bits from a, 4 from c
    hashes[4] = hashes[3]  # e: the same bytes as d
    hashes[5] = hashes[3] ^ np.uint64(0b11)  # f: 2 bits from d and e
    ids, shas = ["c", "a", "b", "d", "e", "f"], ["s1", "s2", "s3", "s4", "s4", "s6"]
    report = find_duplicates(ids, ["x", "x", "y", "x", "x", "x"], shas, hashes, NearDuplicateConfig(max_distance=2))
    # b is 4 bits from c: a cluster holds a and b, or a and c, never all three (no chain).
    assert [c.case_ids for c in report.clusters] == [["a", "b"], ["d", "e", "f"]]
    assert report.group_of == {"c": "c", "a": "a", "b": "a", "d": "d", "e": "d", "f": "d"}
    assert [c.case_ids for c in report.conflicts] == [["a", "b"]]
    assert report.exact_groups == [["d", "e"]] and report.counts()["near_duplicate_clusters"] == 2
    off = find_duplicates(ids, ["x"] * 6, shas, None, NearDuplicateConfig(enabled=False))
    assert [c.case_ids for c in off.clusters] == [["d", "e"]]
    with pytest.raises(M2SNetError, match="0..63 bits"):
        NearDuplicateConfig(max_distance=64)


def test_exact_duplicates_are_never_separated_by_the_diameter_bound():
    """Two byte-identical copies, each 6 bits from a different third image that is 12 bits from the other
    third: whatever the linkage does with the thirds, the copies share a cluster."""
    hashes = _chain(7, step=2)  # d(i, j) = 2 |i - j|
    hashes = np.concatenate([hashes, hashes[3:4]])  # case "h" has the bytes of case "d" (index 3)
    ids = ["a", "b", "c", "d", "e", "f", "g", "h"]
    shas = ["sa", "sb", "sc", "sd", "se", "sf", "sg", "sd"]
    report = find_duplicates(ids, ["x"] * 8, shas, hashes, NearDuplicateConfig(max_distance=4))
    assert report.group_of["d"] == report.group_of["h"]
    for cluster in report.clusters:
        assert _diameter(ids, hashes, cluster.case_ids) <= 4


def test_large_clusters_are_named_in_a_warning(caplog):
    hashes = _chain(6, step=1)  # all six within 5 bits of each other
    ids = [f"c{k}" for k in range(6)]
    config = NearDuplicateConfig(max_distance=8, warn_cluster_size=4)
    report = find_duplicates(ids, ["x"] * 6, [f"s{k}" for k in range(6)], hashes, config)
    assert [c.case_ids for c in report.large_clusters] == [ids]
    assert "c0" in report.large_cluster_warnings()[0] and "6 cases" in report.large_cluster_warnings()[0]
    assert NearDuplicateConfig().warn_cluster_size == 10
    assert find_duplicates(ids, ["x"] * 6, [f"s{k}" for k in range(6)], hashes).large_clusters == []


def test_perceptual_hash_survives_resize_and_reencoding_not_content():
    from m2snet.data.demo import make_case

    a = Image.fromarray(make_case(0, "benign", 1, 128)[0])
    b = Image.fromarray(make_case(0, "benign", 2, 128)[0])
    ha = perceptual_hashes(a)
    same = np.stack([ha, perceptual_hashes(_jpeg(a.resize((90, 90)), 60)), perceptual_hashes(b)])
    assert [(i, j) for i, j, _ in near_pairs(same, 8)] == [(0, 1)]


KVASIR_ROOT = Path(os.environ.get("M2SNET_KVASIR_ROOT", Path(__file__).resolve().parents[2] / "shared" / "data"
                                  / "kvasir-seg"))


@pytest.mark.slow
def test_kvasir_seg_clusters_stay_small():
    """Issue 17.5 on real Kvasir-SEG (1000 polyps; union-find made one cluster of 143): hashes of the
    source images as the import takes them, clustered as the import clusters them."""
    from m2snet.data.importers import get_importer

    if not (KVASIR_ROOT / "images").is_dir():
        pytest.skip(f"real Kvasir-SEG not found at {KVASIR_ROOT} (set M2SNET_KVASIR_ROOT to run this test)")
    cases = get_importer("kvasir").scan(KVASIR_ROOT)
    hashes = []
    for case in cases:
        with Image.open(case.image) as im:
            hashes.append(perceptual_hashes(im.convert("RGB")))
    ids = [c.case_id for c in cases]
    for bits in (8, get_importer("kvasir").near_duplicate_threshold):  # BUSI's threshold, Kvasir's own (4)
        config = NearDuplicateConfig(max_distance=bits)
        report = find_duplicates(ids, ["polyp"] * len(ids), ids, np.stack(hashes), config)
        assert len(cases) == 1000 and report.large_clusters == []
        assert max(len(c.case_ids) for c in report.clusters) <= NearDuplicateConfig().warn_cluster_size
    # At 4 bits: 10 pairs, 5 of them one scene (checked by eye with tools/cluster_montage.py).
    assert max(len(c.case_ids) for c in report.clusters) == 2 and len(report.clusters) == 10
