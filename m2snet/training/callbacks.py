"""What the trainer tells the outside world: three events and the protocol of their listeners.

The trainer knows nothing of MLflow, Optuna or progress reporting: each is a :class:`TrainCallback`
the caller attaches (``train(cfg, callbacks=[...])``); MLflow tracking is
``m2snet.mlops.training_run.MlflowCallback``, attached by the workflow layer
(``m2snet.mlops.training_run.tracking_callbacks``).
A callback may raise to stop the run after an epoch: the checkpoint of that epoch is already
written, so the run stays resumable.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable

from m2snet.training.config import TrainConfig
from m2snet.training.schedule import LR_PREFIX


@dataclass
class TrainStart:
    """Before the first epoch (also when resuming: ``start_epoch`` epochs are already done)."""

    config: TrainConfig
    out_dir: Path
    device: str
    start_epoch: int
    n_params: int
    train_cases: list[str] = field(repr=False)
    epoch_val_cases: list[str] = field(repr=False)  # scored after every epoch
    reported_cases: list[str] = field(repr=False)  # the fold's validation cases
    dataset_version: str | None = None
    split_sha256: str | None = None
    pretrained_source: str | None = None
    loss_pretrained_source: str | None = None
    step_precision: str | None = None  # what amp/channels_last became on this device (training.speed)


@dataclass
class EpochEnd:
    """After each epoch, once its checkpoints are written."""

    epoch: int  # 1-based epochs completed
    epochs: int
    metrics: dict[str, float]  # the history row: train_loss, train_*, lr_<group>, val_* (when validated), seconds
    out_dir: Path
    checkpoint: Path  # last.pt of this epoch (resumable)
    selected: bool = False  # the selection rule chose this epoch: model.pt was rewritten

    @property
    def train_loss(self) -> float:
        return self.metrics["train_loss"]

    @property
    def val_metrics(self) -> dict[str, float]:
        return {k: v for k, v in self.metrics.items() if k.startswith("val_")}

    @property
    def learning_rates(self) -> dict[str, float]:
        return {k: v for k, v in self.metrics.items() if k.startswith(LR_PREFIX)}


@dataclass
class TrainEnd:
    """After the last epoch, BatchNorm recalibration, history.json and the learning curves."""

    config: TrainConfig
    out_dir: Path
    checkpoint: Path  # model.pt
    selected_epoch: int
    selection_score: float
    history: list[dict[str, float]] = field(repr=False)


@runtime_checkable
class TrainCallback(Protocol):
    def on_train_start(self, event: TrainStart) -> None: ...

    def on_epoch_end(self, event: EpochEnd) -> None: ...

    def on_train_end(self, event: TrainEnd) -> None: ...


class Callback:
    """A :class:`TrainCallback` that ignores every event: subclass it and override what you need."""

    def on_train_start(self, event: TrainStart) -> None:
        pass

    def on_epoch_end(self, event: EpochEnd) -> None:
        pass

    def on_train_end(self, event: TrainEnd) -> None:
        pass


class OnEpochEnd(Callback):
    """A plain function of :class:`EpochEnd` as a callback (e.g. Optuna's report-and-prune)."""

    def __init__(self, fn: Callable[[EpochEnd], None]) -> None:
        self.fn = fn

    def on_epoch_end(self, event: EpochEnd) -> None:
        self.fn(event)


CallbackLike = TrainCallback | Callable[[EpochEnd], None]


def as_callbacks(callbacks: CallbackLike | Iterable[CallbackLike] | None) -> list[TrainCallback]:
    """None, one callback or several -> a list; a bare function becomes an :class:`OnEpochEnd`."""
    if callbacks is None:
        return []
    if isinstance(callbacks, TrainCallback) or callable(callbacks):
        callbacks = [callbacks]
    return [cb if isinstance(cb, TrainCallback) else OnEpochEnd(cb) for cb in callbacks]
