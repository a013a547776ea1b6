"""Pipeline presets and the defaults every door (CLI, pipeline, local run) shares: defined once, here.

A preset fixes the data source, the training knobs, the tuning budget and the promotion gate;
``tiny`` is the test preset, ``demo`` the README's first command (a few minutes on 2 CPU cores),
``busi`` the real four-fold BUSI protocol on GPUs, ``busi-cpu`` the same protocol at a budget a 2-core CPU
box affords (resumable per fold, so a CV can span sittings: ``m2snet cv --preset busi-cpu --resume``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Mapping

from m2snet.errors import M2SNetError
from m2snet.mlops.promotion_gate import PromotionPolicy
from m2snet.training.config import TrainConfig
from m2snet.workflows.tuning import TuningConfig

DEFAULT_MODEL_NAME = "m2snet-busi"  # the registered model the pipeline versions
DEFAULT_PRESET = "demo"
# The paper's shared training recipe (Sec. 4.1) on GPUs. Epochs: the paper's counts were lost in the text
# extraction; 50 is the reference script's.
PAPER_RECIPE = dict(size=352, epochs=50, batch_size=16, num_workers=4, progress=False)
# The paper's recipe (its learning rates, triangle schedule, flip + rotation, multi-scale) on all of a fold's
# training cases at the budget of a 2-core CPU box (docs/results/busi-cpu.md): 128 px (scales {96, 128}),
# batch 8, bf16 autocast where the CPU has native bf16 (TrainConfig.amp), no LossNet (its VGG-16 is only
# meaningful with ImageNet weights and costs a third of a step). Nothing here was chosen on a reported fold:
# the rates and schedule are the paper's, the epochs what the box affords.
BUSI_CPU_RECIPE = dict(size=128, epochs=20, batch_size=8, lossnet_weight=0.0, lossnet_pretrained=False,
                       val_every=2, progress=False)
FIXED_PROTOCOL_PRESETS = ("polyp", "polyp-video", "covid", "oct")  # m2snet.workflows.protocols.PROTOCOLS


@dataclass(frozen=True)
class PipelinePreset:
    name: str
    description: str
    train: dict[str, Any]  # TrainConfig fields (data/split/fold/out_dir are set by the steps)
    n_trials: int  # Optuna trials (all workers together)
    tune_epochs: int  # epochs per trial
    # Optuna's search ranges (log scale); None = TuningConfig's wide defaults. A short study needs a
    # narrow range: its best trial is what the fold then trains with.
    tune_head_lr: tuple[float, float] | None = None
    tune_backbone_ratio: tuple[float, float] | None = None
    demo_cases_per_class: int = 8  # the built-in demo set, used when no data path / DVC revision is given
    demo_size: int = 128  # demo image side in px
    # Use the DVC-tracked demo dataset (data/demo, data.dvc) instead of generating one of
    # demo_cases_per_class / demo_size: the README's run then records the same data version as data.dvc.
    tracked_demo: bool = False
    promotion: PromotionPolicy = field(default_factory=PromotionPolicy)  # the registry's gate
    n_folds: int = 4

    def tuning_config(self, **fields: Any) -> TuningConfig:
        """The preset's tuning budget and search ranges, with the caller's fields (storage, study, ...) on top."""
        ranges = {k: v for k, v in (("head_lr", self.tune_head_lr), ("backbone_ratio", self.tune_backbone_ratio))
                  if v is not None}
        return TuningConfig(**{"n_trials": self.n_trials, "epochs": self.tune_epochs, **ranges, **fields})


PRESETS: dict[str, PipelinePreset] = {
    p.name: p
    for p in (
        PipelinePreset(
            name="tiny",
            description="tests: 12 demo cases at 64 px, 1 epoch, 2 trials of 1 epoch, no LossNet",
            train=dict(size=64, epochs=1, batch_size=4, multiscale=False, pretrained=False, lossnet_weight=0.0,
                       lossnet_pretrained=False, progress=False),
            n_trials=2, tune_epochs=1, demo_cases_per_class=4, demo_size=64,
            promotion=PromotionPolicy(floor=0.0),
        ),
        PipelinePreset(
            name="demo",
            description="first run on a laptop: the DVC-tracked demo set (data/demo, 26 cases) at 64 px, "
                        "12 epochs of batch 4 from random weights, per fold 2 tuning trials of 1 epoch "
                        "around the demo's learning rates, no LossNet (CPU)",
            # 64 px: the lesions stay large (the demo images are 128 px) and a step costs a third of
            # 128 px. The triangle per step (not per epoch): 60 steps ramp and decay smoothly, so the
            # final epoch (the one scored) is past the unstable peak.
            train=dict(size=64, multiscale=False, epochs=12, batch_size=4, head_lr=0.02, backbone_lr=0.002,
                       schedule_unit="step", pretrained=False, lossnet_weight=0.0, lossnet_pretrained=False,
                       progress=True),
            # Nested tuning runs one study per fold (4 studies). Trials this short learn nothing yet
            # (2 epochs did not either: every trial of a fold scored alike, for 15 % more pipeline CPU
            # time), so the search stays near the demo's rates, where any trial's pick trains well.
            n_trials=2, tune_epochs=1, tune_head_lr=(0.01, 0.03), tune_backbone_ratio=(0.05, 0.2),
            tracked_demo=True, promotion=PromotionPolicy(floor=0.0),
        ),
        PipelinePreset(
            name="busi",
            description="BUSI four-fold CV with the paper's recipe (352 px, multi-scale, LossNet) on GPUs",
            train=PAPER_RECIPE, n_trials=20, tune_epochs=10, promotion=PromotionPolicy(floor=0.6),
        ),
        PipelinePreset(
            name="busi-cpu",
            description="BUSI four-fold CV with the paper's recipe on all training cases at a 2-core CPU's budget "
                        "(128 px, 20 epochs of batch 8, no LossNet; bf16 where the CPU has it)",
            # Pipeline tuning: a short study per fold on its inner split, near the paper's head rate.
            train=BUSI_CPU_RECIPE, n_trials=3, tune_epochs=2, tune_head_lr=(0.02, 0.1),
            promotion=PromotionPolicy(floor=0.5),
        ),
        # The fixed-split protocols (m2snet.workflows.protocols; `m2snet pipeline run --protocol NAME`,
        # pipelines/protocol.yaml): the same recipe, no tuning (the paper searched none); their recipe
        # differences are the protocol's. n_trials/n_folds only matter if given to the CV pipeline.
        *(PipelinePreset(name=name, description=f"{name}: the paper's recipe (352 px, multi-scale, LossNet) on "
                         "GPUs, one fixed split with named test sets (the protocol pipeline)",
                         train=PAPER_RECIPE, n_trials=20, tune_epochs=10, promotion=PromotionPolicy(floor=0.6))
          for name in FIXED_PROTOCOL_PRESETS),
    )
}


def get_preset(name: str) -> PipelinePreset:
    try:
        return PRESETS[name]
    except KeyError:
        raise M2SNetError(f"unknown pipeline preset {name!r}; choose one of {sorted(PRESETS)}") from None


def parse_overrides(text: str | Mapping[str, Any] | None) -> dict[str, Any]:
    if not text:
        return {}
    if isinstance(text, Mapping):
        return dict(text)
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise M2SNetError(f"train_overrides: not a JSON object ({err}): {text!r}") from None
    if not isinstance(value, dict):
        raise M2SNetError(f"train_overrides: expected a JSON object of TrainConfig fields, got {text!r}")
    return value


def train_config(preset: str, overrides: str | Mapping[str, Any] | None = None, **fields: Any) -> TrainConfig:
    """The preset's TrainConfig with the user's overrides, then the step's own fields on top."""
    cfg = {**get_preset(preset).train, **parse_overrides(overrides), **fields}
    return TrainConfig.from_dict(cfg, source=f"preset {preset!r} + overrides")



# --- precedence ------------------------------------------------------------------------------------
# The learning rates tuning chooses, and how the backbone's follows the head's: the study searches the
# head rate and the backbone/head ratio (m2snet.workflows.tuning.suggest).
TUNED_RATES = ("head_lr", "backbone_lr")
LR_SOURCE = "{}.source"  # the provenance param of a rate: head_lr.source = preset | tuned | user | derived


def settle_config(cfg: TrainConfig, tuned: Mapping[str, float] | None,
                  explicit: frozenset[str] | set[str] = frozenset()) -> tuple[TrainConfig, dict[str, str]]:
    """THE precedence, for ``m2snet train``/``cv`` and every pipeline step: preset < tuned < the user's
    explicit override. Return the fold's config and, per learning rate, where its value came from.

    ``cfg``: the preset (or ``--config`` file, or TrainConfig's defaults) with the user's overrides on top;
    ``explicit``: the fields the user set (``--set``, the CLI's shortcuts, the pipeline's
    ``train_overrides``); ``tuned``: the study's best values (``head_lr``, ``backbone_lr``).

    A derived value is derived after precedence is settled: a user's ``head_lr`` with a tuned study and no
    user ``backbone_lr`` gives ``backbone_lr = head_lr x the study's backbone/head ratio`` (source
    ``derived``), not the backbone rate the study derived from ITS head rate.
    """
    tuned = dict(tuned or {})
    changes = {k: v for k, v in tuned.items() if k not in explicit}
    sources = {k: "user" if k in explicit else "tuned" if k in tuned else "preset" for k in TUNED_RATES}
    if ("head_lr" in explicit and "backbone_lr" not in explicit
            and {"head_lr", "backbone_lr"} <= tuned.keys() and tuned["head_lr"] > 0):
        changes["backbone_lr"] = cfg.head_lr * tuned["backbone_lr"] / tuned["head_lr"]
        sources["backbone_lr"] = "derived"
    return cfg.override(**changes), sources


def rate_params(cfg: TrainConfig, sources: Mapping[str, str]) -> dict[str, Any]:
    """The rates a run used and their provenance, as params: ``head_lr``, ``head_lr.source``, ..."""
    return {k: v for name in TUNED_RATES for k, v in ((name, getattr(cfg, name)),
                                                      (LR_SOURCE.format(name), sources.get(name, "preset")))}
