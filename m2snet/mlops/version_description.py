"""A registered version's description (markdown): what the model is, what it scored, and the
promotion decision taken on it."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping

from m2snet.evaluation.metrics import DEFAULT_PROTOCOL

if TYPE_CHECKING:
    from m2snet.mlops.promotion_gate import PromotionDecision

PROMOTION_MARK = "**Promotion:**"  # the line of a version's description that promote() rewrites


def describe_version(*, n_folds: int, dataset_version: str, split_sha256: str, cv_metrics: Mapping[str, Any],
                     pipeline_run_id: str = "", metric_protocol: str = DEFAULT_PROTOCOL,
                     guard_rates: Mapping[str, Any] | None = None) -> str:
    """A registered version's description (markdown): what the model is and what it scored."""
    def pct(name: str, stat: str = "mean") -> str:
        mean = cv_metrics.get(f"cv_{name}_{stat}")
        std = cv_metrics.get(f"cv_{name}_std" if stat == "mean" else f"cv_{name}_{stat}_std")
        if mean is None:
            return "n/a"
        return f"{float(mean):.2f} %" + (f" ± {float(std):.2f}" if std is not None else "")

    lines = [
        f"Ensemble of {n_folds} fold models (mean of their foreground probabilities) from one "
        f"{n_folds}-fold cross-validation.",
        "",
        f"- **CV Dice:** {pct('dice')} (mean ± std over folds); IoU {pct('iou')}; "
        f"metric protocol `{metric_protocol}`",
        f"- **No skill (all background) on the same cases:** Dice {pct('dice', 'noskill')}; "
        f"IoU {pct('iou', 'noskill')}",
        f"- **Lesion cases only:** Dice {pct('lesion_dice')} (no skill {pct('lesion_dice', 'noskill')})",
        f"- **Data version:** `{dataset_version}` (DVC hash); split sha256 `{split_sha256[:16]}`",
    ]
    if guard_rates and not guard_rates.get("held_out_cases"):
        lines.append("- **Input guard:** fitted, its false-flag rate not measured (too few held-out cases); "
                     "predictions return `ood_score` and `ood_flag` (score > 1)")
    elif guard_rates:
        lines.append(f"- **Input guard:** flags {100 * float(guard_rates['held_out_flag_rate']):.1f} % of "
                     f"{guard_rates['held_out_cases']} held-out cases of the training data (each scored by the fold "
                     f"model that never trained on it; threshold: quantile {guard_rates['quantile']} of held-out "
                     "distances); predictions return `ood_score` and `ood_flag` (score > 1)")
    if pipeline_run_id:
        lines.append(f"- **Pipeline run:** `{pipeline_run_id}`")
    return "\n".join(lines)


def with_decision(description: str | None, decision: "PromotionDecision") -> str:
    base = (description or "").split(PROMOTION_MARK)[0].rstrip()
    verdict = "promoted to `production`" if decision.promoted else "not promoted"
    return f"{base}\n\n{PROMOTION_MARK} {verdict} -- {decision.reason}".lstrip()
