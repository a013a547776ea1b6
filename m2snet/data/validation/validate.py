"""``validate_dataset``: read the facts from the files, cluster duplicates with the recorded settings, check
the rules with great-expectations, and report."""

from __future__ import annotations

import os
from collections import Counter, defaultdict
from typing import Any

from m2snet.data.duplicates import LINKAGE, DuplicateReport, NearDuplicateConfig, find_duplicates
from m2snet.data.format import DatasetInfo, load_dataset
from m2snet.data.validation.facts import case_facts, foreground_summary
from m2snet.data.validation.report import ValidationReport
from m2snet.data.validation.rules import MAX_SIZE, MIN_SIZE, check_rules, dataset_rules


def validate_dataset(
    root: str | os.PathLike,
    *,
    allow_duplicates: bool | None = None,
    allow_label_conflicts: bool | None = None,
    near_duplicates: NearDuplicateConfig | None = None,
    min_size: int = MIN_SIZE,
    max_size: int = MAX_SIZE,
    write_report: bool = True,
    notes: list[str] | None = None,
) -> ValidationReport:
    """Validate a dataset directory; write ``<root>.validation.json/.html`` beside it when ``write_report``.

    Defaults come from dataset.json. ``near_duplicates`` other than the recorded settings reports the
    clusters those settings find, without requiring the manifest's groups to match them (a re-import
    with those settings regroups). ``notes`` (from the import) are carried into the report.
    """
    info = load_dataset(root)
    allow = bool(info.meta.get("allow_duplicates", False)) if allow_duplicates is None else allow_duplicates
    allow_conflicts = (
        bool(info.meta.get("allow_label_conflicts", False)) if allow_label_conflicts is None else allow_label_conflicts
    )
    recorded = NearDuplicateConfig.from_meta(info.meta.get("near_duplicates"))
    notes = list(notes or []) + _linkage_notes(info)
    near = recorded if near_duplicates is None else near_duplicates
    df, hashes = case_facts(info, near)
    dups = find_duplicates(
        [c.case_id for c in info.cases], [c.label for c in info.cases], [c.sha256 for c in info.cases], hashes, near,
    )
    _add_cluster_facts(df, info, dups)
    outcomes = check_rules(df, dataset_rules(info, allow, allow_conflicts, near == recorded, min_size, max_size))
    foreground, outliers = foreground_summary(info, df)
    report = ValidationReport(
        root=info.root, n_cases=len(info.cases), outcomes=outcomes,
        class_counts=dict(sorted(Counter(c.label for c in info.cases).items())),
        duplicates=_exact_duplicates(info), allow_duplicates=allow, clusters=dups,
        allow_label_conflicts=allow_conflicts, foreground=foreground, outliers=outliers, notes=notes,
    )
    if write_report:
        report.write(info)
    return report


def _linkage_notes(info: DatasetInfo) -> list[str]:
    """A note when the recorded clusters were made with another linkage than today's (an older m2snet)."""
    recorded_meta = info.meta.get("near_duplicates") or {}
    if recorded_meta and recorded_meta.get("linkage") != LINKAGE:
        return [
            f"{info.root / 'dataset.json'}: the duplicate clusters were made by an older m2snet, whose "
            "single-linkage clusters chain unrelated images; re-import to regroup (the group check compares "
            f"with {LINKAGE}-linkage clusters)"
        ]
    return []


def _add_cluster_facts(df: Any, info: DatasetInfo, dups: DuplicateReport) -> None:
    """Two more facts per case from the clusters found: is it in a label conflict, is its group the cluster."""
    conflicted = {cid for cl in dups.conflicts for cid in cl.case_ids}
    df["label_conflict"] = [c.case_id in conflicted for c in info.cases]
    df["group_matches"] = [c.group == dups.group_of[c.case_id] for c in info.cases]


def _exact_duplicates(info: DatasetInfo) -> list[list[str]]:
    """Groups of case ids whose image bytes are identical (by the manifest's sha256)."""
    by_hash: dict[str, list[str]] = defaultdict(list)
    for case in info.cases:
        by_hash[case.sha256].append(case.case_id)
    return sorted(sorted(ids) for ids in by_hash.values() if len(ids) > 1)
