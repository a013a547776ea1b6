"""K-fold cross-validation splits: stratified by class label, duplicate clusters kept together.

Why groups, and the groups a source knows: :mod:`m2snet.data.grouping`. Inner splits (tuning,
``selection="inner"``) follow the same rule inside a fold's training cases (:func:`inner_split`).

Why this assignment rather than sklearn's StratifiedGroupKFold: we need folds within one case of
each other per class (the BUSI protocol's four folds) and byte-stable output for a seed with no
sklearn dependency. Groups of several cases are placed first (largest first), then the single
cases of each label are dealt, in a seeded order, to the fold that has the fewest of that label.
"""

from __future__ import annotations

import logging
import os
import random
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from m2snet.data.format import DatasetInfo, load_dataset
from m2snet.data.grouping import (
    FROM_DATASET,
    DuplicateRule,
    case_groups,
    check_group_column,
    resolve_group_by,
)
from m2snet.errors import M2SNetError
from m2snet.files import read_json, write_json
from m2snet.hashing import sha256_file

log = logging.getLogger(__name__)
# Share of a fold's training cases held out as its inner validation set (tuning, selection="inner").
INNER_VAL_FRACTION = 0.2

SPLIT_FORMAT_VERSION = 2
# Version 3: a fixed-split protocol (``"protocol": "fixed"``, one training/validation fold plus
# named test sets); k-fold files stay version 2 and unchanged.
FIXED_SPLIT_FORMAT_VERSION = 3
READABLE_SPLIT_VERSIONS = (1, 2, 3)  # version 1: groups by sha256 only


@dataclass(frozen=True)
class Fold:
    fold: int
    train: list[str]
    val: list[str]


@dataclass
class Split:
    """A loaded split file. ``sha256`` is the hash of the file's bytes (recorded by training for lineage)."""

    n_folds: int
    seed: int
    folds: list[Fold]
    dataset_version: str | None
    stratify: str = "label"
    group: str = "cluster"  # the duplicate rule: "sha256" in version-1 files and old-protocol splits
    group_by: str | None = None  # the manifest column whose values stay on one side, if any
    path: Path | None = None
    sha256: str | None = None
    counts: list[dict[str, int]] = field(default_factory=list)
    groups_kept_together: dict[str, int] = field(default_factory=dict)
    # "kfold" (version 1/2 files) or "fixed" (version 3: fold 0 = the training and validation sets).
    protocol: str = "kfold"
    test_sets: dict[str, list[str]] = field(default_factory=dict)  # name -> case ids (fixed only)
    # Groups on two sides of a fixed split as made from the source's subsets (reported, not refused).
    crossings: list[dict[str, Any]] = field(default_factory=list)

    @property
    def is_fixed(self) -> bool:
        return self.protocol == "fixed"

    def fold(self, k: int) -> Fold:
        if not 0 <= k < self.n_folds:
            raise M2SNetError(f"{self.path or 'split'}: fold {k} out of range 0..{self.n_folds - 1}")
        return self.folds[k]


def default_split_path(root: str | os.PathLike, n_folds: int, seed: int) -> Path:
    """Beside the dataset, not inside it: writing into the dataset would change its DVC hash."""
    root = Path(root).resolve()
    return root.parent / f"{root.name}.split-{n_folds}fold-seed{seed}.json"


def assign_folds(labels: list[str], groups: list[list[int]], n_folds: int, seed: int) -> list[int]:
    """Fold index of each case; every group in one fold, per-label counts as even as the groups allow."""
    rng = random.Random(seed)
    fold_of = [-1] * len(labels)
    per_label: list[Counter] = [Counter() for _ in range(n_folds)]
    totals = [0] * n_folds
    fold_order = list(range(n_folds))
    rng.shuffle(fold_order)  # which fold gets the "extra" case is decided by the seed, not by index

    def place(members: list[int]) -> None:
        group_labels = Counter(labels[i] for i in members)

        def cost(f: int) -> tuple:
            # Fewest cases of this group's labels first, then fewest cases overall.
            return (sum(per_label[f][lab] for lab in group_labels), totals[f], fold_order.index(f))

        best = min(range(n_folds), key=cost)
        for i in members:
            fold_of[i] = best
        per_label[best].update(group_labels)
        totals[best] += len(members)

    multi = sorted((sorted(g) for g in groups if len(g) > 1), key=lambda g: (-len(g), g[0]))
    for members in multi:
        place(members)
    singles_by_label: dict[str, list[int]] = defaultdict(list)
    for g in groups:
        if len(g) == 1:
            singles_by_label[labels[g[0]]].append(g[0])
    for label in sorted(singles_by_label):
        members = sorted(singles_by_label[label])
        rng.shuffle(members)
        for i in members:
            place([i])
    return fold_of


def make_split(
    root: str | os.PathLike | DatasetInfo,
    n_folds: int = 4,
    seed: int = 42,
    out: str | os.PathLike | None = None,
    group_by: str | None = FROM_DATASET,
    duplicates: DuplicateRule = "cluster",
) -> Split:
    """Compute the split of a dataset and write it as JSON (to ``out`` or the default path).

    ``group_by``: a manifest column (e.g. ``sequence``) whose every value goes to one fold, on top
    of the duplicate clusters (default: the dataset's own, :func:`dataset_group_by`; None: none);
    ``duplicates``: which duplicates stay together (see DuplicateRule).
    """
    info = root if isinstance(root, DatasetInfo) else load_dataset(root)
    group_by = resolve_group_by(info, group_by)
    if n_folds < 2:
        raise M2SNetError(f"--folds must be at least 2, got {n_folds}")
    if duplicates not in ("cluster", "sha256"):
        raise M2SNetError(f"duplicates={duplicates!r} must be 'cluster' or 'sha256'")
    grouping = check_group_column(info, group_by) if group_by else None
    groups = case_groups(info.cases, duplicates, group_by)
    if len(groups) < n_folds:
        what = "distinct images" if grouping is None else f"groups (duplicates and {group_by!r} values)"
        raise M2SNetError(
            f"{info.root}: {len(info.cases)} cases in {len(groups)} {what} cannot fill {n_folds} folds"
        )
    labels = [c.label for c in info.cases]
    fold_of = assign_folds(labels, groups, n_folds, seed)
    ids = [c.case_id for c in info.cases]
    folds, counts = [], []
    for k in range(n_folds):
        val = sorted(ids[i] for i in range(len(ids)) if fold_of[i] == k)
        train = sorted(ids[i] for i in range(len(ids)) if fold_of[i] != k)
        folds.append({"fold": k, "train": train, "val": val})
        counts.append(dict(sorted(Counter(labels[i] for i in range(len(ids)) if fold_of[i] == k).items())))
    multi = [g for g in groups if len(g) > 1]
    largest = max(map(len, groups))
    if largest * n_folds > len(ids):
        # One group larger than a fold: the folds cannot be balanced (a chain of clusters and values).
        log.warning("%s: one group holds %d of %d cases, more than a fold's share: the folds cannot be even "
                    "(near-duplicate clusters joined by the group_by column's values? look at them with "
                    "tools/cluster_montage.py, re-import with a lower --near-duplicate-threshold)",
                    info.root, largest, len(ids))
    payload: dict[str, Any] = {
        "format_version": SPLIT_FORMAT_VERSION,
        "n_folds": n_folds,
        "seed": seed,
        "stratify": "label",
        "group": duplicates,
        "group_by": grouping,
        "dataset": info.name,
        "dataset_version": info.version,
        # Groups of more than one case (duplicate clusters, joined by the group_by column's values),
        # each kept in one fold (the count `data split` prints).
        "groups_kept_together": {"groups": len(multi), "cases": sum(map(len, multi)), "largest": largest},
        "val_label_counts": counts,
        "folds": folds,
    }
    path = Path(out) if out is not None else default_split_path(info.root, n_folds, seed)
    write_json(path, payload)
    return load_split(path)


def inner_split(info: DatasetInfo, case_ids: Sequence[str], val_fraction: float = INNER_VAL_FRACTION,
                seed: int = 42, group_by: str | None = None) -> tuple[list[str], list[str]]:
    """(inner train, inner val) of ``case_ids``: stratified by label, duplicate groups on one side.

    The same assignment as the outer split, with k = round(1 / val_fraction) folds (at most one per
    duplicate group) of which the
    first is the inner validation set: tuning and ``selection="inner"`` never read the outer
    fold's validation cases, and never see one copy of an image while scoring the other.
    """
    if not 0 < val_fraction < 1:
        raise M2SNetError(f"inner validation fraction {val_fraction} must be within (0, 1)")
    by_id = {c.case_id: c for c in info.cases}
    missing = [i for i in case_ids if i not in by_id]
    if missing:
        raise M2SNetError(f"{info.root}: inner split names unknown cases {missing[:5]}")
    cases = [by_id[i] for i in sorted(case_ids)]
    groups = case_groups(cases, "cluster", group_by)
    if len(groups) < 2:
        raise M2SNetError(f"{info.root}: {len(cases)} training cases in {len(groups)} distinct image(s) cannot be "
                          "split into inner training and validation sets")
    # A tiny set with fewer groups than 1 / val_fraction holds out one group (a larger share).
    k = max(2, min(round(1 / val_fraction), len(groups)))
    fold_of = assign_folds([c.label for c in cases], groups, k, seed)
    val = [c.case_id for c, f in zip(cases, fold_of) if f == 0]
    train = [c.case_id for c, f in zip(cases, fold_of) if f != 0]
    return train, val


def write_inner_split(info: DatasetInfo, outer: "Split", fold: int, out: str | os.PathLike,
                      val_fraction: float = INNER_VAL_FRACTION, seed: int = 42) -> Path:
    """Fold ``fold``'s training cases split by :func:`inner_split`, as a 1-fold split file."""
    train, val = inner_split(info, outer.fold(fold).train, val_fraction, seed, outer.group_by)
    write_json(out, {
        "format_version": SPLIT_FORMAT_VERSION, "n_folds": 1, "seed": seed, "stratify": "label",
        "group": "cluster", "group_by": {"column": outer.group_by} if outer.group_by else None,
        "dataset": info.name, "dataset_version": outer.dataset_version,
        "inner_of": {"split": str(outer.path), "split_sha256": outer.sha256, "fold": fold,
                     "val_fraction": val_fraction},
        "folds": [{"fold": 0, "train": train, "val": val}],
    })
    return Path(out)


def check_disjoint(sides: Mapping[str, Sequence[str]], where: str) -> None:
    """Refuse a case listed twice on one side, or on two sides (``{"train": ids, "val": ids}``), naming it.

    The one rule behind every split check (a fold's train and val, a fixed split's sets, int8
    calibration against its held-out cases): a case scored must never have been trained on.
    """
    side_of: dict[str, str] = {}
    for side, ids in sides.items():
        counts = Counter(ids)
        twice = next((i for i in ids if counts[i] > 1), None)
        if twice is not None:
            raise M2SNetError(f"{where}: case {twice} is listed twice in {side}")
        both = [i for i in ids if i in side_of]
        if both:
            raise M2SNetError(f"{where}: case {both[0]} is in both {side_of[both[0]]} and {side} ({len(both)} "
                              "case(s) on two sides): it would be scored after being trained on")
        side_of.update(dict.fromkeys(ids, side))


_UNVERSIONED_WARNED: set[Path] = set()  # legacy split files already warned about in this process


def check_split(split: Split, info: DatasetInfo | None = None, accept_version: str | None = None) -> Split:
    """THE split validator, run on every split file loaded (:func:`load_split`); returns ``split``.

    Always: in every fold, no case on both sides and none twice on one side (a fixed split: its
    training, validation and test sets pairwise). With the dataset ``info`` the split is used on: every
    id is one of its cases, and the dataset version the split was made for is the data's, unless
    ``accept_version`` names that version (the user's explicit ``--accept-split-version``; the run records
    it). A split without a recorded version (an older m2snet's) is used with a warning naming the file.
    """
    where = split.path or "split"
    for f in split.folds:
        sides = {"train": f.train, "val": f.val}
        if split.is_fixed:
            sides.update({f"test set {name}": ids for name, ids in split.test_sets.items()})
        for ids in sides.values():
            odd = next((i for i in ids if not isinstance(i, str)), None)
            if odd is not None:
                raise M2SNetError(f"{where}: fold {f.fold}: case id {odd!r} is not a string")
        check_disjoint(sides, f"{where}: fold {f.fold}")
    if info is None:
        return split
    known = {c.case_id for c in info.cases}
    for f in split.folds:
        for side, ids in {"train": f.train, "val": f.val, **split.test_sets}.items():
            unknown = [i for i in ids if i not in known]
            if unknown:
                raise M2SNetError(f"{where}: fold {f.fold}: case {unknown[0]} ({len(unknown)} case(s) of {side}) "
                                  f"is not in {info.root}; was the split made for another dataset?")
    made_for, now = split.dataset_version, info.version
    if made_for is None:
        if split.path not in _UNVERSIONED_WARNED:
            _UNVERSIONED_WARNED.add(split.path)
            log.warning("%s records no dataset version (written by an older m2snet): used on %s (version %s) "
                        "unchecked; re-split (`m2snet data split`) to record it", where, info.root, now)
    elif made_for != now:
        if accept_version is None:
            raise M2SNetError(f"{where}: made for dataset version {made_for}, but {info.root} is version {now} "
                              "(the same case ids with other data?); re-split it (`m2snet data split`), or accept "
                              f"it by naming that version: --accept-split-version {made_for}")
        if accept_version != made_for:
            raise M2SNetError(f"{where}: --accept-split-version {accept_version} is not the version it was made "
                              f"for ({made_for}; {info.root} is {now})")
        log.warning("%s: made for dataset version %s, used on %s (version %s): accepted by name "
                    "(--accept-split-version)", where, made_for, info.root, now)
    return split


def _id_list(value: Any) -> list[str]:
    if not isinstance(value, list):  # list("case") would be four one-letter ids
        raise TypeError(f"a list of case ids expected, got {type(value).__name__}")
    return list(value)


def load_split(path: str | os.PathLike, dataset: DatasetInfo | None = None, *,
               accept_version: str | None = None) -> Split:
    """Read a split file and validate it (:func:`check_split`): against ``dataset`` too when given, as
    every consumer that uses the split's cases on a dataset must."""
    path = Path(path)
    if not path.is_file():
        raise M2SNetError(f"{path}: split file not found (create one with `m2snet data split DATASET`)")
    data = read_json(path, "split file")
    if not isinstance(data, dict):
        raise M2SNetError(f"{path}: a split file is a JSON object (format_version, folds, ...), "
                          f"not a JSON {type(data).__name__}")
    if data.get("format_version") not in READABLE_SPLIT_VERSIONS:
        raise M2SNetError(f"{path}: unsupported split format_version {data.get('format_version')!r}")
    try:
        folds = [Fold(int(f["fold"]), _id_list(f["train"]), _id_list(f["val"])) for f in data["folds"]]
        n_folds = int(data["n_folds"])
    except (KeyError, TypeError, ValueError) as err:
        raise M2SNetError(f"{path}: malformed split file ({err!r})") from None
    if len(folds) != n_folds or [f.fold for f in folds] != list(range(n_folds)):
        raise M2SNetError(f"{path}: expected folds 0..{n_folds - 1}, found {[f.fold for f in folds]}")
    protocol = data.get("protocol", "kfold")
    test_sets = data.get("test_sets") or {}
    if (protocol == "fixed") != (data["format_version"] == FIXED_SPLIT_FORMAT_VERSION):
        raise M2SNetError(f"{path}: protocol {protocol!r} does not match format_version {data['format_version']}")
    if protocol == "fixed" and (n_folds != 1 or not isinstance(test_sets, dict) or not test_sets
                                or not all(isinstance(v, list) and v for v in test_sets.values())):
        raise M2SNetError(f"{path}: a fixed split needs one fold and at least one non-empty named test set")
    return check_split(Split(
        n_folds=n_folds,
        seed=int(data.get("seed", 0)),
        folds=folds,
        dataset_version=data.get("dataset_version"),
        stratify=data.get("stratify", "label"),
        group=data.get("group", "sha256"),
        group_by=(data.get("group_by") or {}).get("column"),
        groups_kept_together=dict(data.get("groups_kept_together", {})),
        path=path.resolve(),
        sha256=sha256_file(path),
        counts=list(data.get("val_label_counts", [])),
        protocol=protocol,
        test_sets={str(k): [str(i) for i in v] for k, v in test_sets.items()},
        crossings=list(data.get("crossings", [])),
    ), dataset, accept_version)
