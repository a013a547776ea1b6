"""Selection rules: which epoch's weights become a run's result (``model.pt``), as registered objects.

A rule says which cases are scored after every epoch (``epoch_cases``: the fold's validation cases,
or an inner split of its training cases), what it scores from the history so far, whether a score
beats the best one so far, and how it describes itself (the ``epoch_val_cases`` MLflow param, the
CV record). ``TrainConfig.selection`` names one; config validation, :func:`m2snet.training.cases.resolve_cases`,
the trainer and the tracking callback all read the rule from here, so a new rule is one
:func:`register_selection` call (in this file for a built-in, anywhere for an experiment).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Literal

from m2snet.errors import M2SNetError

EpochCases = Literal["fold", "inner"]  # the fold's validation cases / an inner split of its training cases


@dataclass(frozen=True)
class SelectionRule:
    """The default rule: the best epoch by validation Dice (by -train loss when nothing is validated)."""

    name: str
    description: str  # what the per-epoch validation cases are, for people (MLflow, the CV record)
    epoch_cases: EpochCases = "fold"
    warning: str | None = None  # logged when a run starts with this rule

    NOT_SCORED: ClassVar[float] = -math.inf  # the score "selected so far" starts from

    def score(self, history: list[dict[str, float]]) -> float:
        """The score of the latest epoch (``history[-1]``); higher is better."""
        row = history[-1]
        return row.get("val_dice", -row["train_loss"])

    def chooses(self, score: float, best: float, epoch: int, epochs: int) -> bool:
        """Whether 1-based ``epoch`` of ``epochs``, scoring ``score``, replaces the selection scoring ``best``."""
        return score > best


@dataclass(frozen=True)
class FinalEpoch(SelectionRule):
    """The last epoch, whatever it scores."""

    def chooses(self, score: float, best: float, epoch: int, epochs: int) -> bool:
        return epoch == epochs


_RULES: dict[str, SelectionRule] = {}


def register_selection(rule: SelectionRule) -> SelectionRule:
    if rule.name in _RULES:
        raise ValueError(f"selection rule {rule.name!r} registered twice")
    _RULES[rule.name] = rule
    return rule


def list_selections() -> list[str]:
    return list(_RULES)


def selection_rule(name: str) -> SelectionRule:
    try:
        return _RULES[name]
    except KeyError:
        raise M2SNetError(f"unknown selection rule {name!r}; available: {', '.join(_RULES)}") from None


# The paper's, the reference's and nnU-Net's practice; the fold's validation cases are scored every
# epoch for the learning curves only.
register_selection(FinalEpoch("final", "fold validation (curves only)"))
# The best epoch on cases carved out of the fold's TRAINING cases (grouped, stratified): the fold's
# validation cases are not read during training.
register_selection(SelectionRule("inner", "inner split of the training cases", epoch_cases="inner"))
# Test-set selection: kept only to measure the first version's optimism (bench/busi_cv.py --protocol old).
register_selection(SelectionRule(
    "fold_best", "fold validation (SELECTS: leaky)",
    warning="selection=fold_best: the checkpoint is chosen on the cases the fold reports "
            "(test-set selection); its metrics are optimistic"))
