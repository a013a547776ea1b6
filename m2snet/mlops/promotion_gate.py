"""The promotion gate: the policy a candidate version must pass to become production, and the rules
that judge it (pure: tested without a registry) from the versions' CV tags and per-case results."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from m2snet.errors import M2SNetError
from m2snet.evaluation.compare import average_seeds, compare_paired, lineage_difference, pair
from m2snet.mlops.cv_results import version_cases

if TYPE_CHECKING:  # heavy: imported lazily at run time
    from mlflow import MlflowClient
    from mlflow.entities.model_registry import ModelVersion

SCORE_TAG = "cv_dice"  # the promotion metric: mean CV Dice as a fraction (0..1)
# The no-skill predictor's (all background) mean CV Dice on the same cases, a fraction (0..1); the tag
# cv_dice_noskill holds the same in percent.
NOSKILL_TAG = "noskill_dice"


@dataclass(frozen=True)
class PromotionPolicy:
    """The gate a candidate must pass to become production."""

    floor: float = 0.5  # minimum CV Dice (0..1) any production model must reach
    margin: float = 0.005  # how much it must beat the current production CV Dice by (0..1)
    # How much it must beat the all-background predictor's CV Dice by (0..1): that predictor scores the
    # share of normal (empty-mask) cases, 0.17 on BUSI, so a floor alone lets a model that finds nothing
    # through. 0.05: five Dice points of actual lesion finding.
    noskill_margin: float = 0.05
    metric_tag: str = SCORE_TAG
    noskill_tag: str = NOSKILL_TAG
    # The statistical gate (decide_with_ci): when candidate and production were cross-validated on the
    # same data version and split, the candidate must beat production with the lower bound of the paired
    # bootstrap 95 % CI of the per-case Dice difference above zero, instead of the margin. When they were
    # not (or a side kept no per-case results), the margin rule decides and the reason says so.
    require_ci: bool = False

    def __post_init__(self) -> None:
        if not 0.0 <= self.floor <= 1.0:
            raise M2SNetError(f"promotion floor={self.floor} must be within 0..1 (a Dice score)")
        if self.margin < 0:
            raise M2SNetError(f"promotion margin={self.margin} must be >= 0")
        if self.noskill_margin < 0:
            raise M2SNetError(f"promotion noskill_margin={self.noskill_margin} must be >= 0")

    def describe(self) -> str:
        """The gate in one line, as the version's ``promotion_policy`` tag records it."""
        return (f"floor={self.floor:g} margin={self.margin:g} noskill_margin={self.noskill_margin:g} "
                f"require_ci={self.require_ci}")


@dataclass(frozen=True)
class PromotionDecision:
    name: str
    version: str
    promoted: bool
    reason: str
    candidate_score: float | None
    production_version: str | None  # production before the decision
    production_score: float | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)



def version_score(mv: "ModelVersion", metric_tag: str = SCORE_TAG) -> float | None:
    raw = mv.tags.get(metric_tag)
    if raw is None:
        return None
    try:
        value = float(raw)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def decide(candidate: float | None, production: float | None, policy: PromotionPolicy, *,
           noskill: float | None = None, production_version: str | None = None) -> tuple[bool, str]:
    """The promotion rule alone (pure: tested without a registry). The reason starts with the rule that
    decided: ``floor``, ``no-skill``, ``production`` (or the missing tag).

    ``noskill``: the candidate's no-skill CV Dice; ``production_version``: the current production version,
    if any (its ``production`` score may be None: registered without CV tags, then nothing to compare with).
    """
    if candidate is None:
        return False, f"candidate has no {policy.metric_tag} tag"
    if candidate < policy.floor:
        return False, f"floor rule: CV Dice {candidate:.4f} is below the floor {policy.floor:.4f}"
    if noskill is None:
        return False, (f"no-skill rule: candidate has no {policy.noskill_tag} tag (the all-background "
                       "predictor's CV Dice); re-run its cross-validation, or --force")
    if candidate < noskill + policy.noskill_margin:
        return False, (f"no-skill rule: CV Dice {candidate:.4f} does not beat the no-skill (all-background) "
                       f"predictor's {noskill:.4f} by the margin {policy.noskill_margin:.4f}")
    passed = (f"all rules pass: CV Dice {candidate:.4f} >= the floor {policy.floor:.4f}, beats no skill "
              f"({noskill:.4f}) by >= {policy.noskill_margin:.4f}")
    if production_version is not None and production is None:
        return False, (f"production rule: production version {production_version} has no {policy.metric_tag} "
                       "tag, so the candidate cannot be compared with it; use --force to replace it")
    if production is None:
        return True, f"{passed}; no production version yet"
    if candidate < production + policy.margin:
        return False, (f"production rule: CV Dice {candidate:.4f} does not beat production's {production:.4f} "
                       f"by the margin {policy.margin:.4f}")
    return True, f"{passed}; beats production's {production:.4f} by >= {policy.margin:.4f}"



def decide_with_ci(candidate: float | None, production: float | None, policy: PromotionPolicy,
                   ci: tuple[float, float] | None, why_not: str = "", *, noskill: float | None = None,
                   production_version: str | None = None) -> tuple[bool, str]:
    """``policy.require_ci``: the rules of :func:`decide` (floor, no-skill), then the paired CI (candidate -
    production per-case Dice) instead of the production margin; ``ci`` None (not comparable, ``why_not`` says
    why): the margin rule, saying so (pure, like decide)."""
    ok, reason = decide(candidate, production, policy, noskill=noskill, production_version=production_version)
    # Only the production comparison is the CI's to decide; the floor, the no-skill rule and missing tags stand.
    if production is None or not (ok or reason.startswith("production rule")):
        return ok, reason
    if ci is None:
        return ok, f"{reason} (margin rule: no paired comparison with production, {why_not})"
    low, high = ci
    verdict = "lies above zero" if low > 0 else "does not lie above zero"
    return low > 0, (f"statistical rule: CV Dice {candidate:.4f} vs production's {production:.4f}: the paired 95 % "
                     f"CI of the per-case Dice difference [{low:+.4f}, {high:+.4f}] {verdict}")


def paired_dice_ci(candidate: "ModelVersion", production: "ModelVersion",
                   client: "MlflowClient") -> tuple[tuple[float, float] | None, str]:
    """The bootstrap 95 % CI of candidate - production per-case Dice (m2snet.evaluation.compare), or
    (None, why) when the two cannot be paired: another data version or split, no per-case results."""
    try:
        prod, cand = version_cases(client, production), version_cases(client, candidate)
        problem = lineage_difference(prod.lineage(), cand.lineage(), "production", "candidate")
        if problem:
            return None, problem
        dice = compare_paired(pair(average_seeds(prod.rows, ("dice",), prod.origins),
                                   average_seeds(cand.rows, ("dice",), cand.origins)), ("dice",)).metrics["dice"]
    except M2SNetError as err:
        return None, str(err)
    return (dice.ci_low, dice.ci_high), ""
