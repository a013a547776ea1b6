"""Which cases must sit on one side of every split: duplicate clusters and the source's own groups.

Why groups: BUSI holds the same scan several times -- byte-identical copies, and near-identical
ones saved at another size or crop (even under two labels). If two copies land in different folds,
a model is validated on an image it trained on and the CV table is optimistic. The data layer
clusters exact and near duplicates (``m2snet.data.duplicates``) and writes each case's cluster
to the manifest as ``group``; here a group is the union of cases sharing a cluster OR an image
hash, and a group goes to one fold whole. Inner splits (tuning, ``selection="inner"``) follow the
same rule inside a fold's training cases (:func:`inner_split`).

Groups the source knows: a manifest column such as CVC-ClinicDB's ``sequence`` (the video a frame
comes from) or a user's ``patient`` column holds what no image hash can see: frames of one video,
scans of one patient. ``group_by=COLUMN`` (``m2snet data split --group-by COLUMN``) adds "same
non-empty value" to the rule above (the union of both groupings), so every value of the column sits
on one side of every split, inner splits included; the split file records the column. The default
(:data:`FROM_DATASET`) is the column dataset.json names as ``group_by`` (its importer's: CVC-ClinicDB's
``sequence``): a grouping the source knows is never dropped unless asked (``--group-by none``).
"""

from __future__ import annotations

from typing import Any, Literal, Sequence

from m2snet.data.duplicates import UnionFind
from m2snet.data.format import CaseRecord, DatasetInfo
from m2snet.errors import M2SNetError

# Which duplicates stay together: "cluster" = the manifest's duplicate cluster (exact + near) and
# the image hash; "sha256" = byte-identical images only (the first version's rule, kept so that its
# optimism can be measured: bench/busi_cv.py --protocol old).
DuplicateRule = Literal["cluster", "sha256"]

# make_split's / make_fixed_split's default grouping: the column dataset.json names (see
# dataset_group_by). A column name replaces it; None (CLI: ``--group-by none``) groups duplicates only.
FROM_DATASET = "from-dataset"  # never a column's name (those are identifiers)
NO_GROUPING = "none"


def case_groups(cases: Sequence[CaseRecord], duplicates: DuplicateRule = "cluster",
                group_by: str | None = None) -> list[list[int]]:
    """Indices of ``cases`` that must share a fold, each list sorted, in order of first member.

    ``cluster``: cases with the same manifest ``group`` (duplicate cluster) or the same image hash;
    ``sha256``: the same image hash only. ``group_by``: also cases with the same non-empty value
    in that manifest column (an empty value groups nothing).
    """
    uf = UnionFind(len(cases))
    first: dict[tuple[str, str], int] = {}
    for i, case in enumerate(cases):
        keys = [("sha256", case.sha256 or case.case_id)]
        if duplicates == "cluster" and case.group:
            keys.append(("group", case.group))
        if group_by and case.column(group_by):
            keys.append(("column", case.column(group_by)))
        for key in keys:
            if key in first:
                uf.union(first[key], i)
            else:
                first[key] = i
    return sorted(uf.components().values(), key=lambda g: g[0])


def dataset_group_by(info: DatasetInfo) -> str | None:
    """The dataset's own grouping column: dataset.json's ``group_by``; for a dataset imported before it was
    recorded, the grouping its importer records, when the manifest has that column with values."""
    if "group_by" in info.meta:
        return info.group_by
    from m2snet.data.importers import importer_group_by  # the registry, only for such older imports

    column = importer_group_by(info.source_format)
    return column if column and any(c.column(column) for c in info.cases) else None


def group_by_option(text: str | None) -> str | None:
    """The CLI's ``--group-by``: absent = the dataset's grouping (:data:`FROM_DATASET`), ``none`` = none."""
    if text is None:
        return FROM_DATASET
    return None if text.strip().lower() == NO_GROUPING else text


def resolve_group_by(info: DatasetInfo, group_by: str | None) -> str | None:
    """The column a split groups by: ``group_by``, or the dataset's (:func:`dataset_group_by`) for FROM_DATASET."""
    return dataset_group_by(info) if group_by == FROM_DATASET else group_by


def grouping_note(info: DatasetInfo, used: str | None) -> str:
    """One line saying which grouping a split used, and whether it dropped the dataset's own (console, logs)."""
    known = dataset_group_by(info)
    where = ("dataset.json's group_by" if "group_by" in info.meta
             else f"the {info.source_format} importer's, imported before dataset.json recorded it")
    if used and used == known:
        return f"group by {used!r} ({where}: the source's own grouping; --group-by none to split without it)"
    if known:
        return (f"not grouped by {known!r} ({where})" + (f" but by {used!r}" if used else "")
                + f": cases of one {known} may fall on several sides")
    return f"group by {used!r} (--group-by)" if used else "group by: duplicate clusters only"


def check_group_column(info: DatasetInfo, column: str) -> dict[str, Any]:
    """What the split file records of ``--group-by column``; refuses a column the manifest lacks or leaves empty."""
    if column in ("image", "mask") or column not in info.columns:
        raise M2SNetError(f"{info.root / 'manifest.csv'}: no column {column!r} to group by "
                          f"(columns: {', '.join(c for c in info.columns if c not in ('image', 'mask'))})")
    values = [c.column(column) for c in info.cases]
    if not any(values):
        raise M2SNetError(f"{info.root / 'manifest.csv'}: column {column!r} is empty for every case")
    return {"column": column, "values": len(set(v for v in values if v)),
            "cases_without_value": sum(1 for v in values if not v)}


def groups_across(cases: Sequence[CaseRecord], side_of: dict[str, int], group_by: str | None = None) -> list[list[str]]:
    """Groups (``cluster`` rule, plus ``group_by``'s values) whose cases sit on more than one side of a split.

    ``side_of`` maps case id -> fold (or 0 = train, 1 = val); cases not in it are ignored.
    """
    found = []
    for g in case_groups(cases, "cluster", group_by):
        ids = [cases[i].case_id for i in g if cases[i].case_id in side_of]
        if len({side_of[c] for c in ids}) > 1:
            found.append(sorted(ids))
    return found
