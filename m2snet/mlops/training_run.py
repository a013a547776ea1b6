"""The trainer's side of tracking: the params every training run records and the callback that
logs its epochs to a :class:`~m2snet.mlops.tracking.Tracker`."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from m2snet.mlops.tracking import RUN_FILE, Tracker, write_run_file
from m2snet.runtime import git_commit
from m2snet.training.selection import selection_rule

if TYPE_CHECKING:
    from m2snet.training.callbacks import EpochEnd, TrainEnd, TrainStart


def config_params(train_config: dict[str, Any]) -> dict[str, Any]:
    """A TrainConfig as params: ``config.<field>``, except the learning rates, one per optimizer param
    group (``<group>_lr``: ``head_lr``, ``backbone_lr``), which keep their field name: ONE spelling per rate
    in MLflow, beside its provenance ``<group>_lr.source`` (m2snet.workflows.presets.settle_config)."""
    return {(k if k.endswith("_lr") else f"config.{k}"): v for k, v in train_config.items()}


def run_params(train_config: dict[str, Any], *, dataset_version: str | None, split_sha256: str | None,
               pretrained: str | None, loss_pretrained: str | None, device: str, seed: int,
               extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The params every training run records (the contract in docs/architecture.md)."""
    return {
        **config_params(train_config),
        "data_version": dataset_version or "unknown",
        "split_sha256": split_sha256 or "none",
        "git_commit": git_commit(),
        "pretrained": pretrained or "none (random init)",
        "lossnet_pretrained": loss_pretrained or "none (random init)",
        "device": device,
        "seed": seed,
        **(extra or {}),
    }



class MlflowCallback:
    """A training callback (m2snet.training.callbacks.TrainCallback) that logs the run to ``tracker``:
    the params of :func:`run_params` at the start (and the run in ``<out_dir>/mlflow_run.json``), every
    epoch's history row as metrics at step = epoch, and ``selected_epoch`` at the end."""

    def __init__(self, tracker: Tracker) -> None:
        self.tracker = tracker

    def on_train_start(self, event: TrainStart) -> None:
        cfg = event.config
        self.tracker.log_params(run_params(
            cfg.to_dict(), dataset_version=event.dataset_version, split_sha256=event.split_sha256,
            pretrained=event.pretrained_source, loss_pretrained=event.loss_pretrained_source,
            device=event.device, seed=cfg.seed,
            extra={"n_train": len(event.train_cases), "n_val": len(event.reported_cases),
                   "n_epoch_val": len(event.epoch_val_cases), "step_precision": event.step_precision,
                   "epoch_val_cases": selection_rule(cfg.selection).description if cfg.split else "none"}))
        write_run_file(Path(event.out_dir) / RUN_FILE, self.tracker)

    def on_epoch_end(self, event: EpochEnd) -> None:
        self.tracker.log_metrics({k: v for k, v in event.metrics.items() if k != "epoch"}, step=event.epoch,
                                 flush=True)

    def on_train_end(self, event: TrainEnd) -> None:
        self.tracker.log_metrics({"selected_epoch": event.selected_epoch}, step=event.config.epochs, flush=True)



def tracking_callbacks(tracker: Tracker | None) -> list[MlflowCallback]:
    """The training callbacks that log a run to ``tracker`` (None: no tracking). The workflow layer
    attaches them: ``train(cfg, callbacks=tracking_callbacks(tracker))``."""
    return [] if tracker is None else [MlflowCallback(tracker)]
