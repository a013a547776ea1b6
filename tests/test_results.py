"""docs/results/: every committed CV table is what its per-case CSV gives (recomputed by the stand-alone script a
reader would use), and every per-case CSV comes from the committed split's data version and split."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

RESULTS = Path(__file__).resolve().parents[1] / "docs" / "results"
sys.path.insert(0, str(RESULTS))
import recompute_table  # noqa: E402

RUNS = sorted(p.parent for p in RESULTS.rglob("cv_per_case.csv"))


def _cells(table: str) -> list[list[str]]:
    """The numeric cells of a markdown table's data rows (header and rule dropped)."""
    rows = [line for line in table.splitlines() if line.startswith("|") and "±" in line]
    return [re.findall(r"-?\d+\.\d+ ± \d+\.\d+", row) for row in rows]


def test_there_are_committed_results():
    assert RUNS, f"no cv_per_case.csv under {RESULTS}"


@pytest.mark.parametrize("run", RUNS, ids=lambda p: str(p.relative_to(RESULTS)))
def test_the_committed_table_is_what_the_per_case_csv_gives(run: Path):
    committed = _cells((run / "cv_table.md").read_text())
    recomputed = _cells(recompute_table.table(str(run / "cv_per_case.csv")))
    assert recomputed == committed


@pytest.mark.parametrize("run", RUNS, ids=lambda p: str(p.relative_to(RESULTS)))
def test_each_result_names_the_committed_split(run: Path):
    import hashlib

    split_file = RESULTS / "busi-split" / "busi.split-4fold-seed42.json"
    split = json.loads(split_file.read_text())
    lineage = json.loads((run / "cv_lineage.json").read_text())
    assert lineage["data_version"] == split["dataset_version"]
    assert lineage["split_sha256"] == hashlib.sha256(split_file.read_bytes()).hexdigest()
    val = {k: set(f["val"]) for k, f in enumerate(split["folds"])}
    for line in (run / "cv_per_case.csv").read_text().splitlines()[1:]:
        _, fold, case_id = line.split(",")[:3]
        assert case_id in val[int(fold)], (run, fold, case_id)  # scored only on its fold's held-out cases
