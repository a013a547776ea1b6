"""Fixed-split protocols: one training set, an optional validation set and named test sets.

The paper runs k-fold CV on BUSI only; its other experiments use fixed splits (Tab. 1: train on
the PraNet training images, test separately on five sets; Tab. 2: video clips 60 / 20 / 20; Tab. 3:
the Inf-Net split). A fixed split file is a k-fold file of version 3 with ``"protocol": "fixed"``:
its one fold holds the training (``train``) and validation (``val``, may be empty) cases, and
``test_sets`` maps each test set's name to its case ids::

    {"format_version": 3, "protocol": "fixed", "n_folds": 1, "seed": 42, "group": "cluster",
     "group_by": null | {"column", "values", "cases_without_value"}, "dataset": ..., "dataset_version": ...,
     "recipe": {"by": "sets", "train": "subset:train", "val": null, "test": {"CVC-300": "subset:CVC-300"}}
              | {"by": "fractions", "fractions": [0.6, 0.2, 0.2], "test_name": "test"},
     "set_sizes": {"train": 1450, "val": 0, "test:CVC-300": 60, ...},
     "crossings": [{"sets": ["train", "test:Kvasir"], "cases": [...]}],
     "folds": [{"fold": 0, "train": [...], "val": [...]}],
     "test_sets": {"CVC-300": [...], ...}}

Two ways to make one (:func:`make_fixed_split`):

- **by sets**: each set chosen by a selector (``subset:NAME[,NAME]`` = the manifest's ``subset``
  column, ``ids:FILE`` = case ids one per line, ``rest`` = every case no other set took). These
  sets are the source's, so a duplicate cluster or ``group_by`` value may fall on two sides (the
  PraNet split puts frames of one ClinicDB video in training and test): such *crossings* are
  recorded in the file and printed, or refused with ``on_leak="refuse"``.
- **by fractions**: whole groups (duplicate clusters, joined by ``group_by``'s values such as a
  video clip) are dealt to train / val / test in a seeded order until each side holds its share of
  the cases, so no group is ever on two sides (e.g. ``60/20/20 --group-by clip``, or ``900/0/100``).
"""

from __future__ import annotations

import os
import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

from m2snet.data.format import DatasetInfo, load_dataset
from m2snet.data.grouping import FROM_DATASET, case_groups, check_group_column, groups_across, resolve_group_by
from m2snet.data.split import FIXED_SPLIT_FORMAT_VERSION, Split, load_split
from m2snet.errors import M2SNetError
from m2snet.files import write_json

LeakPolicy = Literal["report", "refuse"]
TRAIN, VAL = "train", "val"


@dataclass(frozen=True)
class Selector:
    """Which cases a set holds: ``subset:A,B``, ``ids:FILE`` or ``rest`` (see the module docstring)."""

    text: str

    def kind(self) -> str:
        return self.text.split(":", 1)[0] if ":" in self.text else self.text

    def select(self, info: DatasetInfo, taken: set[str]) -> list[str]:
        kind, _, arg = self.text.partition(":")
        if kind == "rest" and not arg:
            return sorted(c.case_id for c in info.cases if c.case_id not in taken)
        if kind == "subset" and arg:
            names = [n for n in arg.split(",") if n]
            known = sorted({c.subset for c in info.cases if c.subset})
            unknown = [n for n in names if n not in known]
            if unknown:
                raise M2SNetError(f"{info.root / 'manifest.csv'}: no subset {unknown[0]!r} "
                                  f"(subsets: {', '.join(known) or 'none'})")
            return sorted(c.case_id for c in info.cases if c.subset in names)
        if kind == "ids" and arg:
            path = Path(arg)
            if not path.is_file():
                raise M2SNetError(f"{path}: case-id list not found")
            ids = [line.strip() for line in path.read_text().splitlines() if line.strip()
                   and not line.lstrip().startswith("#")]
            known = {c.case_id for c in info.cases}
            unknown = [i for i in ids if i not in known]
            if unknown:
                raise M2SNetError(f"{path}: {len(unknown)} case ids not in {info.root} (e.g. {unknown[:3]})")
            if not ids:
                raise M2SNetError(f"{path}: no case ids")
            return sorted(set(ids))
        raise M2SNetError(f"set selector {self.text!r}: expected subset:NAME[,NAME], ids:FILE or rest")


def parse_test_sets(items: Sequence[str]) -> dict[str, str]:
    """``["CVC-300=subset:CVC-300", "COVID=ids:infnet-test.txt"]`` -> {name: selector} (``--test`` options)."""
    tests: dict[str, str] = {}
    for item in items:
        name, sep, selector = item.partition("=")
        if not sep or not name or not selector:
            raise M2SNetError(f"--test {item!r}: expected NAME=SELECTOR (e.g. CVC-300=subset:CVC-300)")
        tests[name] = selector
    return tests


def parse_fractions(text: str | Sequence[float]) -> tuple[float, float, float]:
    """``"60/20/20"``, ``"900/0/100"`` or three numbers -> train/val/test shares summing to 1."""
    if isinstance(text, str):
        try:
            parts = [float(p) for p in text.replace(",", "/").split("/")]
        except ValueError:
            parts = []
    else:
        parts = [float(p) for p in text]
    if len(parts) != 3 or any(p < 0 for p in parts) or parts[0] <= 0 or parts[2] <= 0:
        raise M2SNetError(f"fractions {text!r}: expected TRAIN/VAL/TEST like 60/20/20 or 900/0/100 "
                          "(train and test above 0)")
    total = sum(parts)
    return parts[0] / total, parts[1] / total, parts[2] / total


def deal_groups(sizes: Sequence[int], shares: Sequence[float], seed: int) -> list[int]:
    """Side (index into ``shares``) of each group: groups in a seeded order, larger first, each to the
    side furthest below its share of the cases -- every group whole on one side."""
    rng = random.Random(seed)
    order = list(range(len(sizes)))
    rng.shuffle(order)
    order.sort(key=lambda g: -sizes[g])  # stable: the seeded order within one size
    total = sum(sizes)
    filled = [0] * len(shares)
    side_of = [-1] * len(sizes)
    for g in order:
        # The side whose share the group's cases would overshoot least, relative to its target.
        open_sides = [s for s, share in enumerate(shares) if share > 0]
        best = min(open_sides, key=lambda s: ((filled[s] + sizes[g]) / (shares[s] * total), s))
        side_of[g] = best
        filled[best] += sizes[g]
    return side_of


@dataclass(frozen=True)
class FixedSets:
    """The sets of a fixed split, as chosen, and the recipe that chose them (recorded in the file)."""

    train: list[str]
    val: list[str]
    tests: dict[str, list[str]]
    recipe: dict[str, Any]

    def sizes(self) -> dict[str, int]:
        return {TRAIN: len(self.train), VAL: len(self.val), **{f"test:{k}": len(v) for k, v in self.tests.items()}}


def make_fixed_split(
    root: str | os.PathLike | DatasetInfo,
    *,
    train: str | None = None,
    val: str | None = None,
    tests: Mapping[str, str] | None = None,
    fractions: str | Sequence[float] | None = None,
    test_name: str = "test",
    group_by: str | None = FROM_DATASET,
    seed: int = 42,
    out: str | os.PathLike | None = None,
    on_leak: LeakPolicy = "report",
) -> Split:
    """Write a fixed split (see the module docstring) and load it back.

    Without ``fractions`` and selectors: ``train`` = the subset ``train`` and one test set per other
    subset (the PraNet layout). ``fractions``: a grouped seeded split into train/val/test, the test
    set named ``test_name``. ``on_leak``: what a set-defined split does with a group on two sides.
    """
    info = root if isinstance(root, DatasetInfo) else load_dataset(root)
    group_by = resolve_group_by(info, group_by)  # default: the dataset's own grouping
    grouping = check_group_column(info, group_by) if group_by else None
    if fractions is not None:
        if train or val or tests:
            raise M2SNetError("give either --fractions or set selectors (--train/--val/--test), not both")
        sets = _sets_by_fractions(info, parse_fractions(fractions), test_name, group_by, seed)
    else:
        sets = _sets_by_selectors(info, train, val, tests)
    empty = [n for n, ids in [(TRAIN, sets.train), *((f"test:{k}", v) for k, v in sets.tests.items())] if not ids]
    if empty:
        raise M2SNetError(f"{info.root}: set {empty[0]} of the fixed split is empty")
    crossings = _crossings(info, sets.train, sets.val, sets.tests, group_by)
    if crossings and on_leak == "refuse":
        c = crossings[0]
        raise M2SNetError(f"{info.root}: {len(crossings)} duplicate group(s)"
                          f"{' or ' + repr(group_by) + ' value(s)' if group_by else ''} on two sides of the fixed "
                          f"split (e.g. {c['cases'][:4]} in {' and '.join(c['sets'])}); use --fractions, or "
                          "--on-leak report to record them")
    path = Path(out) if out is not None else default_fixed_split_path(info.root, sets.recipe, seed)
    write_json(path, _split_file(info, sets, grouping, crossings, seed))
    return load_split(path)


def _sets_by_fractions(info: DatasetInfo, shares: tuple[float, float, float], test_name: str,
                       group_by: str | None, seed: int) -> FixedSets:
    """Whole groups dealt to train / val / test by their shares of the cases (:func:`deal_groups`)."""
    groups = case_groups(info.cases, "cluster", group_by)
    side_of = deal_groups([len(g) for g in groups], shares, seed)
    sides: list[list[str]] = [[], [], []]
    for g, side in zip(groups, side_of):
        sides[side] += [info.cases[i].case_id for i in g]
    return FixedSets(sorted(sides[0]), sorted(sides[1]), {test_name: sorted(sides[2])},
                     {"by": "fractions", "fractions": list(shares), "test_name": test_name})


def _sets_by_selectors(info: DatasetInfo, train: str | None, val: str | None,
                       tests: Mapping[str, str] | None) -> FixedSets:
    """Each set by its selector; without any, the PraNet layout (subset ``train``, one test set per other
    subset). A case chosen by two sets is an error."""
    if not train and not tests:
        subsets = sorted({c.subset for c in info.cases if c.subset})
        if TRAIN not in subsets or len(subsets) < 2:
            raise M2SNetError(f"{info.root / 'manifest.csv'}: no 'train' subset and test subsets to split by "
                              f"(subsets: {', '.join(subsets) or 'none'}); give --train/--test or --fractions")
        train, tests = f"subset:{TRAIN}", {s: f"subset:{s}" for s in subsets if s != TRAIN}
    if not tests:
        raise M2SNetError("a fixed split needs at least one test set (--test NAME=SELECTOR)")
    # 'rest' takes what the other sets left, so it is resolved last.
    named = [(f"test:{n}", s) for n, s in tests.items()]
    named += ([(VAL, val)] if val else []) + [(TRAIN, train or "rest")]
    named.sort(key=lambda t: Selector(t[1]).kind() == "rest")
    chosen: dict[str, list[str]] = {}
    taken: dict[str, str] = {}
    for name, text in named:
        ids = Selector(text).select(info, set(taken))
        twice = [i for i in ids if i in taken]
        if twice:
            raise M2SNetError(f"set {name} ({text}) and set {taken[twice[0]]} both hold {len(twice)} case(s) "
                              f"(e.g. {twice[0]}): a case belongs to one set")
        taken.update({i: name for i in ids})
        chosen[name] = ids
    return FixedSets(chosen[TRAIN], chosen.get(VAL, []), {n: chosen[f"test:{n}"] for n in tests},
                     {"by": "sets", "train": train or "rest", "val": val, "test": dict(tests)})


def _split_file(info: DatasetInfo, sets: FixedSets, grouping: dict[str, Any] | None,
                crossings: list[dict[str, Any]], seed: int) -> dict[str, Any]:
    """The fixed split file's content (format in the module docstring)."""
    set_sizes = sets.sizes()
    label_of = {c.case_id: c.label for c in info.cases}
    return {
        "format_version": FIXED_SPLIT_FORMAT_VERSION,
        "protocol": "fixed",
        "n_folds": 1,
        "seed": seed,
        "stratify": None,
        "group": "cluster",
        "group_by": grouping,
        "dataset": info.name,
        "dataset_version": info.version,
        "recipe": sets.recipe,
        "set_sizes": set_sizes,
        "unused_cases": len(info.cases) - sum(set_sizes.values()),
        "crossings": crossings,
        "val_label_counts": [dict(sorted(Counter(label_of[i] for i in sets.val).items()))],
        "folds": [{"fold": 0, "train": sets.train, "val": sets.val}],
        "test_sets": sets.tests,
    }


def default_fixed_split_path(root: Path, recipe: Mapping[str, Any], seed: int) -> Path:
    """Beside the dataset (as k-fold files): ``<name>.split-fixed-subsets.json`` or ``...-60-20-20-seed42.json``."""
    root = Path(root).resolve()
    if recipe["by"] == "fractions":
        tag = "-".join(f"{round(100 * f):g}" for f in recipe["fractions"]) + f"-seed{seed}"
    else:
        tag = "sets"
    return root.parent / f"{root.name}.split-fixed-{tag}.json"


def _crossings(info: DatasetInfo, train_ids: list[str], val_ids: list[str], test_sets: Mapping[str, list[str]],
               group_by: str | None) -> list[dict[str, Any]]:
    """Groups (duplicate clusters, ``group_by`` values) with cases in two or more sets."""
    names = [TRAIN, VAL, *(f"test:{k}" for k in test_sets)]
    side: dict[str, int] = {i: 0 for i in train_ids}
    side.update({i: 1 for i in val_ids})
    for k, ids in enumerate(test_sets.values()):
        side.update({i: 2 + k for i in ids})
    out = []
    for ids in groups_across(info.cases, side, group_by):
        out.append({"sets": sorted({names[side[i]] for i in ids}, key=names.index), "cases": ids})
    return out
