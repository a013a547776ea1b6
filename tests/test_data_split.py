"""Splits: stratified, duplicate clusters grouped, deterministic, hashed; on the demo and on real BUSI."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import replace
from pathlib import Path

import pytest
from typer.testing import CliRunner

from m2snet.data.demo import make_demo_dataset
from m2snet.data.format import CaseRecord, DatasetInfo, load_dataset
from m2snet.data.importers import import_dataset
from m2snet.data.importers.busi import BusiImporter
from m2snet.data.split import assign_folds, load_split, make_split
from m2snet.errors import M2SNetError
from m2snet.hashing import sha256_file


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
    assert data["format_version"] == 2 and data["stratify"] == "label" and data["group"] == "cluster"
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


def _synthetic_info(tmp_path, groups: dict[str, str], labels: dict[str, str], sha: dict[str, str] | None = None):
    cases = [CaseRecord(cid, labels[cid], tmp_path / f"{cid}.png", tmp_path / f"{cid}_m.png", 8, 8,
                        (sha or {}).get(cid, f"sha-{cid}"), 1, groups[cid]) for cid in sorted(labels)]
    info = DatasetInfo(tmp_path, "synthetic", "busi", 1, ["background", "lesion"], ["a", "b"], cases)
    info.__dict__["version"] = "synthetic-version"
    return info


def test_duplicate_clusters_never_straddle_folds_or_inner_splits(tmp_path):
    """Planted clusters (the manifest's group) stay in one fold and on one side of every inner split,
    across labels too; the old sha256-only rule would have split most of them."""
    from m2snet.data.grouping import groups_across
    from m2snet.data.split import inner_split

    labels = {f"c{i:03d}": "a" if i % 3 else "b" for i in range(60)}
    groups = {cid: cid for cid in labels}
    clusters = [("c001", "c002", "c003"), ("c004", "c005"), ("c010", "c030"), ("c012", "c013"),  # c012: a/b
                ("c020", "c041", "c042", "c043")]
    for members in clusters:
        for cid in members:
            groups[cid] = members[0]
    sha = {"c050": "same", "c051": "same"}  # an exact pair with no shared cluster id still groups
    info = _synthetic_info(tmp_path, groups, labels, sha)
    old_across = 0
    for seed in range(6):
        split = make_split(info, n_folds=4, seed=seed, out=tmp_path / f"s{seed}.json")
        fold_of = {cid: k for k, f in enumerate(split.folds) for cid in f.val}
        assert groups_across(info.cases, fold_of) == []
        assert fold_of["c050"] == fold_of["c051"]
        assert split.groups_kept_together == {"groups": 6, "cases": 15, "largest": 4}
        for k in range(4):
            train, val = inner_split(info, split.fold(k).train, 0.25, seed)
            assert sorted(train + val) == sorted(split.fold(k).train) and not set(train) & set(val)
            assert groups_across(info.cases, {**{c: 0 for c in train}, **{c: 1 for c in val}}) == []
        old = make_split(info, n_folds=4, seed=seed, out=tmp_path / f"old{seed}.json", duplicates="sha256")
        assert old.group == "sha256"
        old_across += len(groups_across(info.cases, {cid: k for k, f in enumerate(old.folds) for cid in f.val}))
    assert old_across > 0  # the first version's rule leaked these clusters


def test_training_refuses_a_split_that_leaks_a_cluster(tmp_path, demo_ds):
    """A split made by the old rule, on a dataset whose manifest clusters two cases, is refused."""
    import csv
    import shutil

    from m2snet.training.cases import resolve_cases
    from m2snet.training.config import TrainConfig

    ds = tmp_path / "ds"
    shutil.copytree(demo_ds, ds)
    split = make_split(ds, n_folds=2, seed=0, out=tmp_path / "s.json")
    a, b = split.fold(0).val[0], split.fold(0).train[0]  # now declare them near-duplicates
    rows = list(csv.DictReader((ds / "manifest.csv").open()))
    for row in rows:
        if row["case_id"] == b:
            row["group"] = min(a, b)
        if row["case_id"] == a:
            row["group"] = min(a, b)
    with (ds / "manifest.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    cfg = TrainConfig(data=str(ds), split=str(tmp_path / "s.json"), fold=0)
    # The manifest changed, so the split was made for another dataset version: refused unless named.
    with pytest.raises(M2SNetError, match="made for dataset version"):
        resolve_cases(cfg)
    cfg = cfg.override(accept_split_version=split.dataset_version)
    with pytest.raises(M2SNetError, match="duplicate group"):
        resolve_cases(cfg)
    assert resolve_cases(cfg.override(leak_check=False)).reported == split.fold(0).val


def test_group_by_a_column_keeps_each_value_in_one_fold_with_the_clusters(tmp_path, caplog):
    """Issue 17.5: a grouping the source knows (a user's ``patient`` column) stays on one side of every
    split and inner split, joined with the duplicate clusters (c000 ~ c031 are near duplicates of two
    patients, so those two patients share a fold)."""
    from m2snet.data.grouping import groups_across
    from m2snet.data.split import inner_split

    labels = {f"c{i:03d}": "a" if i % 3 else "b" for i in range(48)}
    groups = {cid: cid for cid in labels}
    groups["c031"] = "c000"
    info = _synthetic_info(tmp_path, groups, labels)
    patient = {cid: f"p{int(cid[1:]) // 4}" for cid in labels}  # 12 patients of 4 scans
    patient["c047"] = ""  # no value: grouped with nothing
    info.cases = [replace(c, extra=(("patient", patient[c.case_id]),)) for c in info.cases]
    for seed in range(4):
        split = make_split(info, n_folds=3, seed=seed, out=tmp_path / f"p{seed}.json", group_by="patient")
        fold_of = {cid: k for k, f in enumerate(split.folds) for cid in f.val}
        for p in set(patient.values()) - {""}:
            assert len({fold_of[c] for c in labels if patient[c] == p}) == 1, p
        assert fold_of["c000"] == fold_of["c031"]  # patients p0 and p7, joined by a duplicate cluster
        assert groups_across(info.cases, fold_of, "patient") == []
        train, val = inner_split(info, split.fold(0).train, 0.25, seed, "patient")
        assert groups_across(info.cases, {**{c: 0 for c in train}, **{c: 1 for c in val}}, "patient") == []
        assert split.group_by == "patient"
        recorded = json.loads((tmp_path / f"p{seed}.json").read_text())["group_by"]
        assert recorded == {"column": "patient", "values": 12, "cases_without_value": 1}
    # Without the column the patients are spread over folds.
    plain = make_split(info, n_folds=3, seed=0, out=tmp_path / "plain.json")
    assert groups_across(info.cases, {cid: k for k, f in enumerate(plain.folds) for cid in f.val}, "patient")
    # One value on more than a fold's share of the cases: the folds cannot be even, and the split says so.
    import logging

    info.cases = [replace(c, extra=(("patient", "p0" if i < 30 else f"q{i}"),)) for i, c in enumerate(info.cases)]
    with caplog.at_level(logging.WARNING, logger="m2snet.data.split"):
        big = make_split(info, n_folds=3, seed=0, out=tmp_path / "big.json", group_by="patient")
    # c000..c029 share a value and c031 joins them through its cluster with c000.
    assert big.groups_kept_together["largest"] == 31 and "one group holds 31 of 48 cases" in caplog.text
    with pytest.raises(M2SNetError, match="no column 'visit' to group by"):
        make_split(info, n_folds=3, out=tmp_path / "x.json", group_by="visit")
    info.cases = [replace(c, extra=(("patient", ""),)) for c in info.cases]
    with pytest.raises(M2SNetError, match="column 'patient' is empty for every case"):
        make_split(info, n_folds=3, out=tmp_path / "x.json", group_by="patient")
