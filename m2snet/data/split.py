"""K-fold cross-validation splits: stratified by class label, exact duplicates kept together.

Why groups: BUSI holds exact-duplicate images (same bytes, even under different labels). If the
two copies land in different folds, a model is validated on an image it trained on. Cases with
the same sha256 are therefore one group, and a group goes to one fold whole.

Why this assignment rather than sklearn's StratifiedGroupKFold: we need folds within one case of
each other per class (the BUSI protocol's four folds) and byte-stable output for a seed with no
sklearn dependency. Groups of several cases are placed first (largest first), then the single
cases of each label are dealt, in a seeded order, to the fold that has the fewest of that label.
"""

from __future__ import annotations

import json
import os
import random
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from m2snet.common import M2SNetError, sha256_file, write_json
from m2snet.data.format import DatasetInfo, load_dataset

SPLIT_FORMAT_VERSION = 1


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
    group: str = "sha256"
    path: Path | None = None
    sha256: str | None = None
    counts: list[dict[str, int]] = field(default_factory=list)

    def fold(self, k: int) -> Fold:
        if not 0 <= k < self.n_folds:
            raise M2SNetError(f"{self.path or 'split'}: fold {k} out of range 0..{self.n_folds - 1}")
        return self.folds[k]


def default_split_path(root: str | os.PathLike, n_folds: int, seed: int) -> Path:
    """Beside the dataset, not inside it: writing into the dataset would change its DVC hash."""
    root = Path(root).resolve()
    return root.parent / f"{root.name}.split-{n_folds}fold-seed{seed}.json"


def _groups(info: DatasetInfo) -> list[list[int]]:
    """Indices of cases grouped by identical image content (sha256)."""
    by_hash: dict[str, list[int]] = defaultdict(list)
    for i, case in enumerate(info.cases):
        by_hash[case.sha256 or case.case_id].append(i)
    return list(by_hash.values())


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
) -> Split:
    """Compute the split of a dataset and write it as JSON (to ``out`` or the default path)."""
    info = root if isinstance(root, DatasetInfo) else load_dataset(root)
    if n_folds < 2:
        raise M2SNetError(f"--folds must be at least 2, got {n_folds}")
    groups = _groups(info)
    if len(groups) < n_folds:
        raise M2SNetError(
            f"{info.root}: {len(info.cases)} cases in {len(groups)} distinct images cannot fill {n_folds} folds"
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
    payload: dict[str, Any] = {
        "format_version": SPLIT_FORMAT_VERSION,
        "n_folds": n_folds,
        "seed": seed,
        "stratify": "label",
        "group": "sha256",
        "dataset": info.name,
        "dataset_version": info.version,
        "val_label_counts": counts,
        "folds": folds,
    }
    path = Path(out) if out is not None else default_split_path(info.root, n_folds, seed)
    write_json(path, payload)
    return load_split(path)


def load_split(path: str | os.PathLike) -> Split:
    path = Path(path)
    if not path.is_file():
        raise M2SNetError(f"{path}: split file not found (create one with `m2snet data split DATASET`)")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise M2SNetError(f"{path}: invalid JSON ({err})") from None
    if data.get("format_version") != SPLIT_FORMAT_VERSION:
        raise M2SNetError(f"{path}: unsupported split format_version {data.get('format_version')!r}")
    try:
        folds = [Fold(int(f["fold"]), list(f["train"]), list(f["val"])) for f in data["folds"]]
        n_folds = int(data["n_folds"])
    except (KeyError, TypeError, ValueError) as err:
        raise M2SNetError(f"{path}: malformed split file ({err!r})") from None
    if len(folds) != n_folds or [f.fold for f in folds] != list(range(n_folds)):
        raise M2SNetError(f"{path}: expected folds 0..{n_folds - 1}, found {[f.fold for f in folds]}")
    return Split(
        n_folds=n_folds,
        seed=int(data.get("seed", 0)),
        folds=folds,
        dataset_version=data.get("dataset_version"),
        stratify=data.get("stratify", "label"),
        group=data.get("group", "sha256"),
        path=path.resolve(),
        sha256=sha256_file(path),
        counts=list(data.get("val_label_counts", [])),
    )
