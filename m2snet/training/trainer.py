"""The training loop: one loop for every registered model (M2SNet, MSNet, the baselines).

Recipe (defaults of :class:`TrainConfig`, spec "Training recipe"): SGD + Nesterov, backbone and
head parameter groups with their own max LR on the triangular schedule, multi-scale batches, AMP
on CUDA. Each epoch ends with a validation pass (Dice/IoU per image at the train size) and an
atomic checkpoint (``last.pt``: everything needed to resume; ``model.pt``: the run's result, slim,
chosen by the selection rule ``TrainConfig.selection`` names (:mod:`m2snet.training.selection`) --
the final epoch by default, so the cases a fold reports on never pick the checkpoint; see
:func:`m2snet.training.cases.resolve_cases`). :func:`train` reads as its phases: build, restore,
then per epoch train, validate, select-and-save and end (log line, callbacks), then finish.
Resuming restores model, optimizer, scheduler, AMP scaler and every RNG; the order of the training
cases comes from a DataLoader generator seeded by (seed, epoch), so a resumed run reproduces the
uninterrupted one exactly on CPU in deterministic mode. The loop reports to callbacks
(:mod:`m2snet.training.callbacks`) and knows nothing of MLflow; checkpoints are
:class:`m2snet.models.checkpoint.Checkpoint` objects, written through ``Checkpoint.save`` (one
:func:`m2snet.files.atomic_file` each).

The parts the phases use live beside it: the epoch's batches (:mod:`.batches`), one optimisation step
(:mod:`.step`), the validation pass (:mod:`.validate`) and the run's state on disk, resume checks and
checkpoint metadata (:mod:`.run_state`).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from m2snet import progress
from m2snet.data.cache import default_cache_dir
from m2snet.data.dataset import SegmentationDataset
from m2snet.errors import M2SNetError
from m2snet.evaluation.plots import learning_curves
from m2snet.files import write_json
from m2snet.models import create_model
from m2snet.models.checkpoint import Checkpoint, ResumeState, capture_rng_state, restore_rng_state
from m2snet.runtime import resolve_device, seed_everything
from m2snet.training.batches import MultiScaleCollate, TrainBatches, epoch_loader
from m2snet.training.bn_recalibration import recalibrate_run_checkpoints
from m2snet.training.callbacks import CallbackLike, EpochEnd, TrainCallback, TrainEnd, TrainStart, as_callbacks
from m2snet.training.cases import resolve_cases
from m2snet.training.config import ENCODER_STRIDE, LAST, SELECTED, TrainConfig
from m2snet.training.losses import TotalLoss
from m2snet.training.run_state import check_resumable, checkpoint_meta, open_run_dir
from m2snet.training.schedule import build_scheduler, learning_rates
from m2snet.training.selection import selection_rule
from m2snet.training.step import EpochLosses, TrainStep, build_optimizer
from m2snet.training.validate import validate

log = logging.getLogger("m2snet.training")


@dataclass
class TrainResult:
    out_dir: Path
    checkpoint: Path  # model.pt, chosen by config.selection
    last_checkpoint: Path | None  # last.pt (resumable); None when config.keep_last_checkpoint is off
    history: list[dict[str, float]]
    selected_epoch: int
    selection_score: float  # the rule's score of the selected epoch (default rules: val_dice, or -train loss)
    config: TrainConfig
    pretrained_source: str | None = None
    loss_pretrained_source: str | None = None
    dataset_version: str | None = None
    split_sha256: str | None = None
    train_cases: list[str] = field(default_factory=list, repr=False)
    # The fold's validation cases: what the fold reports; under selection="final"/"inner" the run
    # never chose anything on them.
    val_cases: list[str] = field(default_factory=list, repr=False)
    selection_cases: list[str] = field(default_factory=list, repr=False)  # scored every epoch
    device: str = "cpu"


def train(
    cfg: TrainConfig,
    *,
    resume: bool = False,
    callbacks: CallbackLike | Sequence[CallbackLike] | None = None,
) -> TrainResult:
    """Train ``cfg.model`` on ``cfg.data`` (fold ``cfg.fold`` of ``cfg.split``) into ``cfg.out_dir``.

    ``resume``: continue from ``out_dir/last.pt`` (an error if there is none). ``callbacks``
    (:class:`m2snet.training.callbacks.TrainCallback`, or plain functions of :class:`EpochEnd`) get
    the run's start, each epoch's end once its checkpoint is written (raise to stop: the run stays
    resumable) and the end, in the order given; MLflow tracking is one of them
    (``m2snet.mlops.training_run.tracking_callbacks``). With ``cfg.keep_last_checkpoint`` off, ``last.pt``
    is removed once the run has finished (a crash before that still leaves it to resume from).
    """
    cfg.validate()
    run = _Run(cfg, as_callbacks(callbacks))
    resumed = run.open(resume)
    run.build()
    if resumed is not None:
        run.restore(resumed)
        del resumed  # its tensors are not held for the rest of the run
    run.start()
    for epoch in range(run.start_epoch, cfg.epochs):
        ep = run.train_epoch(epoch)
        run.validate_epoch(ep)
        run.select_and_save(ep)
        run.end_epoch(ep)
    return run.finish()


@dataclass
class _Epoch:
    """One epoch in flight: its clock, loss totals, progress bar and history row."""

    index: int  # 0-based
    t0: float
    bar: Any = None
    totals: EpochLosses = field(default_factory=EpochLosses)
    row: dict[str, float] = field(default_factory=dict)
    chosen: bool = False  # the selection rule chose this epoch (model.pt rewritten)

    @property
    def number(self) -> int:  # 1-based, as logged and recorded
        return self.index + 1


class _Run:
    """What the phases of :func:`train` share: the config, the built parts and the run's history."""

    def __init__(self, cfg: TrainConfig, callbacks: list[TrainCallback]) -> None:
        self.cfg, self.callbacks = cfg, callbacks
        self.rule = selection_rule(cfg.selection)
        self.out = Path(cfg.out_dir)
        self.last_path, self.model_path = self.out / LAST, self.out / SELECTED
        self.history: list[dict[str, float]] = []
        self.selected = {"epoch": 0, "score": self.rule.NOT_SCORED}  # also in last.pt (ResumeState)
        self.start_epoch = 0

    # --- build ----------------------------------------------------------------------------------
    def open(self, resume: bool) -> Checkpoint | None:
        """Check the run directory against ``resume``; the checkpoint to resume from, if any."""
        return open_run_dir(self.out, resume)

    def build(self) -> None:
        """Device, seeds, cases, then model, data, loss, optimizer and schedule (in an order that fixes
        what the seeded RNG draws)."""
        cfg = self.cfg
        self.device = resolve_device(cfg.device)
        self.on_cuda = self.device.startswith("cuda")
        seed_everything(cfg.seed, cfg.deterministic)
        self.cases = resolve_cases(cfg)
        self._check_no_batch_of_one_at_1x1()
        if self.rule.warning:
            log.warning(self.rule.warning)
        self._build_model_and_data()
        self._build_optimisation()
        self.collate = MultiScaleCollate(cfg.scales() if cfg.multiscale else [cfg.size])
        self.checkpoint_meta = checkpoint_meta(cfg, self.cases, self.model, self.model_config)

    def _check_no_batch_of_one_at_1x1(self) -> None:
        """TrainBatches avoids a batch of one when the epoch has two cases or more; where it cannot (one
        training case, or batch size 1), an image whose deepest feature map is 1x1 would fail in BatchNorm."""
        cfg, n = self.cfg, len(self.cases.train)
        smallest = min(self.cfg.scales())
        if (n == 1 or cfg.batch_size == 1) and smallest <= ENCODER_STRIDE:
            why = "1 training case" if n == 1 else "batch_size=1"
            raise M2SNetError(
                f"{cfg.data}: {why} makes a training batch of one image at size {smallest}, whose deepest feature "
                f"map is 1x1: BatchNorm needs more than one value per channel in training; use --size "
                f"{2 * ENCODER_STRIDE} or more, or a batch of 2+ images")

    def _build_model_and_data(self) -> None:
        cfg, info = self.cfg, self.cases.info
        self.cache_dir = (cfg.cache_dir or default_cache_dir()) if cfg.cache else None
        self.model_config = {"n_classes": info.n_classes, **cfg.model_config}
        self.model = create_model(cfg.model, pretrained=cfg.pretrained, **self.model_config).to(self.device)
        self.train_ds = self._dataset(self.cases.train, augment=cfg.augment)
        self.val_ds = self._dataset(self.cases.epoch_val, augment=False) if self.cases.epoch_val else None
        self.loss_fn = TotalLoss(n_classes=info.n_classes, lossnet_weight=cfg.lossnet_weight,
                                 lossnet_pretrained=cfg.lossnet_pretrained).to(self.device)

    def _dataset(self, case_ids: list[str], augment: bool) -> SegmentationDataset:
        # The model's preprocessing feeds the data (and is kept in the checkpoint).
        return SegmentationDataset(self.cases.info, case_ids, self.cfg.size, augment=augment, cache_dir=self.cache_dir,
                                   normalization=self.model.normalization)

    def _build_optimisation(self) -> None:
        cfg = self.cfg
        self.optimizer = build_optimizer(self.model, cfg, self.on_cuda)
        steps_per_epoch = len(TrainBatches(len(self.train_ds), cfg.batch_size, torch.Generator()))
        total = cfg.epochs if cfg.schedule_unit == "epoch" else cfg.epochs * steps_per_epoch
        self.scheduler = build_scheduler(self.optimizer, cfg.schedule, total, cfg.warmup_fraction)
        self.train_step = TrainStep(self.model, self.loss_fn, self.optimizer, cfg, self.device)

    @property
    def pretrained_source(self) -> str | None:
        return getattr(self.model, "pretrained_source", None)

    @property
    def loss_pretrained_source(self) -> str | None:
        return getattr(self.loss_fn, "pretrained_source", None)

    # --- restore --------------------------------------------------------------------------------
    def restore(self, ckpt: Checkpoint) -> None:
        """Continue from ``last.pt``: weights, optimizer, schedule, AMP scaler, RNG, history, selection."""
        check_resumable(ckpt, self.cfg, self.last_path)
        state = ckpt.resume
        self.model.load_state_dict(ckpt.state_dict)
        self.optimizer.load_state_dict(state.optimizer)
        self.scheduler.load_state_dict(state.scheduler)
        self.train_step.scaler.load_state_dict(state.scaler)
        restore_rng_state(state.rng)
        self.history, self.selected, self.start_epoch = list(state.history), dict(state.selected), int(ckpt.epoch)
        log.info("resuming %s at epoch %d/%d", self.out, self.start_epoch + 1, self.cfg.epochs)

    def start(self) -> None:
        cfg, cases = self.cfg, self.cases
        cfg.save(self.out / "train_config.json")
        start = TrainStart(config=cfg, out_dir=self.out, device=self.device, start_epoch=self.start_epoch,
                           n_params=sum(p.numel() for p in self.model.parameters()), train_cases=cases.train,
                           epoch_val_cases=cases.epoch_val, reported_cases=cases.reported,
                           dataset_version=cases.info.version, split_sha256=cases.split_sha256,
                           pretrained_source=self.pretrained_source, loss_pretrained_source=self.loss_pretrained_source,
                           step_precision=self.train_step.precision.describe())
        for cb in self.callbacks:
            cb.on_train_start(start)
        log.info("training %s on %d cases (%d val) for %d epochs on %s (%s); scales %s; pretrained: %s", cfg.model,
                 len(cases.train), len(cases.epoch_val), cfg.epochs, self.device, start.step_precision,
                 self.collate.scales, self.pretrained_source)
        self.model.train()

    # --- epoch ----------------------------------------------------------------------------------
    def train_epoch(self, index: int) -> _Epoch:
        """One pass over the training cases; the epoch's row holds its mean losses, LRs and speed."""
        cfg = self.cfg
        ep = _Epoch(index, time.perf_counter())
        lrs = learning_rates(self.optimizer)  # the rates this epoch starts with
        ep.bar = progress.bar(self._loader(self.train_ds, index, shuffle=True), desc=f"epoch {ep.number}/{cfg.epochs}",
                      unit="batch", disable=not cfg.progress, leave=False)
        pending = None  # (step, n, losses) of the previous step, read once the next one is queued
        for step, batch in enumerate(ep.bar):
            x = batch["image"].to(self.device, non_blocking=True)
            y = batch["mask"].to(self.device, non_blocking=True)
            losses = self.train_step(x, y)
            if cfg.schedule_unit == "step":
                self.scheduler.step()
            if pending is not None:
                self._account(ep, *pending)
            pending = (step, x.shape[0], losses)
        if pending is not None:
            self._account(ep, *pending)
        ep.bar.close()
        if cfg.schedule_unit == "epoch":
            self.scheduler.step()
        totals = ep.totals
        ep.row = {"epoch": ep.number, "train_loss": totals.mean("loss"), "train_structure": totals.mean("structure"),
                  "train_lossnet": totals.mean("lossnet"), **lrs,
                  "train_img_per_s": totals.seen / (time.perf_counter() - ep.t0)}
        return ep

    def _loader(self, dataset: SegmentationDataset, index: int, shuffle: bool):
        return epoch_loader(dataset, self.cfg, index, shuffle=shuffle, collate=self.collate, on_cuda=self.on_cuda)

    def _account(self, ep: _Epoch, step: int, n: int, losses: dict[str, torch.Tensor]) -> None:
        """Add a step to the epoch's totals and the progress bar; stop on a non-finite loss, naming where."""
        loss = ep.totals.add(n, losses)
        if not math.isfinite(loss):
            lrs = ", ".join(f"{k}={v:.3g}" for k, v in learning_rates(self.optimizer).items())
            raise M2SNetError(
                f"{self.out}: loss became {loss} at epoch {ep.number} step {step + 1} ({lrs}); "
                "lower the learning rates or check the data; the last good checkpoint is "
                f"{self.last_path if self.last_path.exists() else 'not written yet'}"
            )
        # Shown at the bar's next redraw: refresh=True would redraw once per batch (a line per batch in a log).
        ep.bar.set_postfix(loss=f"{ep.totals.mean('loss'):.4f}",
                           img_s=f"{ep.totals.seen / (time.perf_counter() - ep.t0):.1f}", refresh=False)

    # --- validate -------------------------------------------------------------------------------
    def validate_epoch(self, ep: _Epoch) -> None:
        """Score the per-epoch validation cases every ``val_every`` epochs and at the last one."""
        cfg = self.cfg
        if self.val_ds is not None and (ep.number % cfg.val_every == 0 or ep.number == cfg.epochs):
            ep.row.update(validate(self.train_step.forward, self._loader(self.val_ds, ep.index, shuffle=False),
                                   self.loss_fn, self.device, self.cases.info.n_classes, self.train_step.amp))
        ep.row["epoch_seconds"] = time.perf_counter() - ep.t0
        self.history.append(ep.row)

    # --- select and save ------------------------------------------------------------------------
    def select_and_save(self, ep: _Epoch) -> None:
        """``model.pt`` when the selection rule chooses this epoch, and ``last.pt`` (resumable) always;
        both through :meth:`Checkpoint.save` (one atomic write each)."""
        score = self.rule.score(self.history)
        ep.chosen = self.rule.chooses(score, self.selected["score"], ep.number, self.cfg.epochs)
        ckpt = self._checkpoint(ep)
        if ep.chosen:
            self.selected = {"epoch": ep.number, "score": score}
            dataclasses.replace(ckpt, selected_epoch=ep.number).save(self.model_path)
        ckpt.resume = ResumeState(optimizer=self.optimizer.state_dict(), scheduler=self.scheduler.state_dict(),
                                  scaler=self.train_step.scaler.state_dict(), rng=capture_rng_state(),
                                  history=self.history, selected=self.selected)
        ckpt.save(self.last_path)

    def _checkpoint(self, ep: _Epoch) -> Checkpoint:
        return Checkpoint(**self.checkpoint_meta, epoch=ep.number, metrics=ep.row,
                          state_dict={k: v.detach().cpu() for k, v in self.model.state_dict().items()})

    def end_epoch(self, ep: _Epoch) -> None:
        """The epoch's log line, then the callbacks (its checkpoints are on disk)."""
        row = ep.row
        log.info("epoch %d/%d: loss %.4f%s | %.1f img/s | %.1fs%s", ep.number, self.cfg.epochs, row["train_loss"],
                 "".join(f" {k} {row[k]:.4f}" for k in ("val_dice", "val_iou") if k in row),
                 row["train_img_per_s"], row["epoch_seconds"], " *selected*" if ep.chosen else "")
        progress.emit("epoch", epoch=ep.number, epochs=self.cfg.epochs, loss=row["train_loss"],
                      val_dice=row.get("val_dice"))
        end = EpochEnd(ep.number, self.cfg.epochs, row, self.out, checkpoint=self.last_path, selected=ep.chosen)
        for cb in self.callbacks:
            cb.on_epoch_end(end)

    # --- finish ---------------------------------------------------------------------------------
    def finish(self) -> TrainResult:
        """BatchNorm recalibration (optional), ``last.pt`` dropped unless kept, history and curves, callbacks."""
        cfg, cases = self.cfg, self.cases
        kept = (self.model_path, self.last_path) if cfg.keep_last_checkpoint else (self.model_path,)
        if cfg.recalibrate_bn:  # the saved weights' BatchNorm statistics, from their training cases
            recalibrate_run_checkpoints(kept, self.model, self._dataset(cases.train, augment=False), cfg.batch_size,
                                        cfg.seed, self.device, cfg.num_workers)
        if not cfg.keep_last_checkpoint:  # the run is complete: nothing left to resume
            self.last_path.unlink(missing_ok=True)
        write_json(self.out / "history.json", self.history)
        if self.history:
            learning_curves(self.history, self.out / "learning_curves.png", title=f"{cfg.model} fold {cfg.fold}")
        epoch, score = int(self.selected["epoch"]), float(self.selected["score"])
        end = TrainEnd(config=cfg, out_dir=self.out, checkpoint=self.model_path, selected_epoch=epoch,
                       selection_score=score, history=self.history)
        for cb in self.callbacks:
            cb.on_train_end(end)
        return TrainResult(
            out_dir=self.out, checkpoint=self.model_path,
            last_checkpoint=self.last_path if cfg.keep_last_checkpoint else None, history=self.history,
            selected_epoch=epoch, selection_score=score, config=cfg, pretrained_source=self.pretrained_source,
            loss_pretrained_source=self.loss_pretrained_source, dataset_version=cases.info.version,
            split_sha256=cases.split_sha256, train_cases=cases.train, val_cases=cases.reported,
            selection_cases=cases.epoch_val, device=self.device)
