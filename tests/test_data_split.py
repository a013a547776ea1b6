"""Splits: stratified, duplicates grouped, deterministic, hashed; on the demo and on real BUSI."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
from typer.testing import CliRunner

from m2snet.common import M2SNetError, sha256_file
from m2snet.data.demo import make_demo_dataset
from m2snet.data.format import CaseRecord, DatasetInfo, load_dataset
from m2snet.data.importers import BusiImporter, import_dataset
from m2snet.data.split import assign_folds, load_split, make_split


@pytest.fixture(scope="module")
def demo_ds(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("split")
    make_demo_dataset(root / "raw", n_per_class=(9, 6, 5), size=48, seed=1)
    return import_dataset("busi", root / "raw", root / "ds", progress=False).root


def _check_folds(split, info) -> None:
    labels = {c.case_id: c.label for c in info.cases}
    all_ids = set(labels)
    vals = [set(f.val) for f in split.folds]
    assert set().union(*vals) == all_ids and sum(map(len, vals)) == len(all_ids)  # a partition
    for f in split.folds:
        assert set(f.train) == all_ids - set(f.val)
    per_label = [Counter(labels[i] for i in v) for v in vals]
    for label in set(labels.values()):
        counts = [c[label] for c in per_label]
        assert max(counts) - min(counts) <= 1, (label, counts)


def test_split_is_stratified_deterministic_and_hashed(demo_ds, tmp_path):
    a = make_split(demo_ds, n_folds=4, seed=5, out=tmp_path / "a.json")
    b = make_split(demo_ds, n_folds=4, seed=5, out=tmp_path / "b.json")
    c = make_split(demo_ds, n_folds=4, seed=6, out=tmp_path / "c.json")
    assert (tmp_path / "a.json").read_bytes() == (tmp_path / "b.json").read_bytes()
    assert a.sha256 == b.sha256 == sha256_file(tmp_path / "a.json")
    assert [f.val for f in a.folds] != [f.val for f in c.folds]
    a_info = load_dataset(demo_ds)
    _check_folds(a, a_info)
    data = json.loads((tmp_path / "a.json").read_text())
    assert data["format_version"] == 1 and data["stratify"] == "label" and data["group"] == "sha256"
    assert data["dataset_version"] == a_info.version == a.dataset_version
    assert load_split(tmp_path / "a.json").fold(2).val == a.folds[2].val
    with pytest.raises(M2SNetError, match="fold 4 out of range"):
        a.fold(4)


def test_duplicates_share_a_fold():
    labels = ["a"] * 10 + ["b"] * 6
    groups = [[0, 10], [1, 2, 3]] + [[i] for i in range(4, 10)] + [[i] for i in range(11, 16)]
    for seed in range(5):
        fold_of = assign_folds(labels, groups, 3, seed)
        assert fold_of[0] == fold_of[10] and fold_of[1] == fold_of[2] == fold_of[3]
        per = [Counter(labels[i] for i in range(16) if fold_of[i] == k) for k in range(3)]
        assert max(c["b"] for c in per) - min(c["b"] for c in per) <= 1


def test_split_cli_and_bad_input(demo_ds, tmp_path):
    from m2snet.cli import app

    out = tmp_path / "s.json"
    result = CliRunner().invoke(app, ["data", "split", str(demo_ds), "--folds", "3", "--seed", "1", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert load_split(out).n_folds == 3 and "fold 2:" in result.output
    with pytest.raises(M2SNetError, match="at least 2"):
        make_split(demo_ds, n_folds=1, out=tmp_path / "x.json")
    out.write_text("{}")
    with pytest.raises(M2SNetError, match="unsupported split format_version"):
        load_split(out)


def test_busi_folds_within_one_case_per_class_and_duplicates_together(busi_root, tmp_path):
    """On the real BUSI listing (sha256 of the source images; no full import needed, so it is fast)."""
    scanned = [(sc, sha256_file(sc.image)) for sc in BusiImporter().scan(busi_root)]
    # group = the exact-duplicate cluster id (smallest case id with the same bytes), as format 2 records it.
    first_of: dict[str, str] = {}
    for sc, sha in sorted(scanned, key=lambda t: t[0].case_id):
        first_of.setdefault(sha, sc.case_id)
    cases = [
        CaseRecord(sc.case_id, sc.label, sc.image, sc.masks[0], 0, 0, sha, 0, first_of[sha], subset=sc.subset)
        for sc, sha in scanned
    ]
    info = DatasetInfo(busi_root, "busi", "busi", 1, ["background", "lesion"], ["benign", "malignant", "normal"], cases)
    info.__dict__["version"] = "not-computed-for-this-test"
    assert Counter(c.label for c in cases) == {"benign": 437, "malignant": 210, "normal": 133}
    by_hash = Counter(c.sha256 for c in cases)
    dup_ids = sorted(c.case_id for c in cases if by_hash[c.sha256] > 1)
    assert dup_ids == ["benign_0433", "malignant_0145"]  # the one exact-duplicate pair in BUSI
    for seed in (0, 42):
        split = make_split(info, n_folds=4, seed=seed, out=tmp_path / f"busi-{seed}.json")
        _check_folds(split, info)
        fold_of = {cid: k for k, f in enumerate(split.folds) for cid in f.val}
        assert fold_of["benign_0433"] == fold_of["malignant_0145"]
