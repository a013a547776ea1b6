"""The learning-rate schedule of the reference recipe.

lr(e) = max_lr * (1 - |2 (e + 1) / (E + 1) - 1|): a linear rise to the middle of training and a
linear decay after it (a triangle). ``e`` counts epochs (reference) or optimisation steps
(``schedule_unit="step"``, the same triangle at finer grain). The factor is never 0 for
0 <= e < E, so the first and last epochs still learn. ``peak`` moves the apex: with x = (e + 1) /
(E + 1) the factor is x / peak before it and (1 - x) / (1 - peak) after it; 0.5 is the reference's
triangle (a warm-up over half the run), a smaller value a shorter warm-up.
"""

from __future__ import annotations

import torch


def triangle_factor(index: int, total: int, peak: float = 0.5) -> float:
    """The multiplier of max_lr at 0-based ``index`` of ``total`` epochs (or steps)."""
    if total < 1:
        raise ValueError("total must be >= 1")
    if not 0.0 < peak < 1.0:
        raise ValueError(f"peak must be in (0, 1), got {peak}")
    x = (index + 1) / (total + 1)
    return x / peak if x <= peak else (1.0 - x) / (1.0 - peak)


def build_scheduler(
    optimizer: torch.optim.Optimizer, kind: str, total: int, peak: float = 0.5
) -> torch.optim.lr_scheduler.LRScheduler:
    """A LambdaLR over each param group's initial (max) LR. ``total`` is epochs or steps.

    The optimizer's LR is set to the factor of index 0 straight away (LambdaLR does this on
    construction), and ``scheduler.step()`` moves to the next epoch/step.
    """
    if kind == "triangle":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: triangle_factor(min(i, total - 1), total, peak))
    if kind == "constant":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: 1.0)
    raise ValueError(f"unknown schedule {kind!r}")


# The per-epoch learning-rate metrics (history rows, MLflow) are named after the optimizer's param
# groups (m2snet.training.step.param_groups: "backbone", "head" -> lr_backbone, lr_head).
LR_PREFIX = "lr_"


def lr_metric(group: str) -> str:
    """The metric name of param group ``group``'s learning rate."""
    return f"{LR_PREFIX}{group}"


def learning_rates(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """Each param group's current learning rate, by :func:`lr_metric` of the group's name."""
    return {lr_metric(g["name"]): g["lr"] for g in optimizer.param_groups}
