"""Which cases a training run uses: the fold's training cases, the cases scored after every epoch
(the selection rule's ``epoch_cases``: the fold's validation cases, or an inner split of its
training cases), and the fold's validation cases left for its report. Shared by the trainer and BatchNorm
recalibration, which must see exactly the training cases the run saw.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from m2snet.data.format import load_dataset
from m2snet.data.grouping import groups_across
from m2snet.data.split import inner_split, load_split
from m2snet.errors import M2SNetError
from m2snet.training.config import TrainConfig
from m2snet.training.selection import selection_rule


def _subsample(ids: list[str], n: int | None, seed: int) -> list[str]:
    if n is None or n >= len(ids):
        return list(ids)
    return sorted(random.Random(seed).sample(sorted(ids), n))


@dataclass
class FoldCases:
    """Which cases a run trains on, scores every epoch, and leaves for the fold's report."""

    info: Any  # DatasetInfo
    train: list[str]
    epoch_val: list[str]  # scored after every epoch (learning curves; what a best-epoch rule selects on)
    reported: list[str]  # the fold's validation cases (empty without a split)
    split_sha256: str | None


def resolve_cases(cfg: TrainConfig) -> FoldCases:
    """The cases of the config's data/split/fold under its selection rule (see TrainConfig.selection).

    With ``leak_check``, a fold that puts two copies of one image (a duplicate cluster of the
    manifest, or the same bytes), or two cases of one value of the split's ``group_by`` column, on
    both sides is an error: the split was made by an older rule or the manifest changed.
    """

    if not cfg.data:
        raise M2SNetError("no dataset given (TrainConfig.data / --data)")
    info = load_dataset(cfg.data)
    seed = cfg.seed if cfg.case_seed is None else cfg.case_seed
    split_sha = None
    if cfg.split:
        split = load_split(cfg.split, info, accept_version=cfg.accept_split_version)
        fold = split.fold(cfg.fold)
        train_ids, val_ids, split_sha = list(fold.train), list(fold.val), split.sha256
        if cfg.leak_check:
            leaks = groups_across(info.cases, {**{c: 0 for c in train_ids}, **{c: 1 for c in val_ids}},
                                  split.group_by)
            if leaks:
                raise M2SNetError(
                    f"{cfg.split}: fold {cfg.fold} has {len(leaks)} duplicate group(s) on both sides "
                    f"(e.g. {leaks[0]}): the validation cases would be scored on copies of training images. "
                    f"Re-split with `m2snet data split {cfg.data}` (groups duplicate clusters), or set "
                    "leak_check=false to measure a leaky split on purpose")
        if selection_rule(cfg.selection).epoch_cases == "inner":
            train_ids, epoch_val = inner_split(info, train_ids, cfg.inner_val_fraction, seed, split.group_by)
            epoch_val = _subsample(epoch_val, cfg.max_val_cases, seed + 2)
        else:
            epoch_val = None  # the fold's validation cases, subsampled below
    else:
        train_ids, val_ids, epoch_val = [c.case_id for c in info.cases], [], []
    train_ids = _subsample(train_ids, cfg.max_train_cases, seed)
    val_ids = _subsample(val_ids, cfg.max_val_cases, seed + 1)
    if not train_ids:
        raise M2SNetError(f"{cfg.data}: no training cases (fold {cfg.fold})")
    return FoldCases(info, train_ids, val_ids if epoch_val is None else epoch_val, val_ids, split_sha)
