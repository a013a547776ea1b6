"""The training loop: one loop for every registered model (M2SNet, MSNet, the baselines).

Recipe (defaults of :class:`TrainConfig`, spec "Training recipe"): SGD + Nesterov, backbone and
head parameter groups with their own max LR on the triangular schedule, multi-scale batches, AMP
on CUDA. Each epoch ends with a validation pass (Dice/IoU per image at the train size) and an
atomic checkpoint (``last.pt``: everything needed to resume; ``model.pt``: the run's result, slim,
chosen by ``TrainConfig.selection`` -- the final epoch by default, so the cases a fold reports on
never pick the checkpoint; see :func:`m2snet.training.cases.resolve_cases`). Resuming restores model, optimizer,
scheduler, AMP scaler and every RNG; the order of the training cases comes from a DataLoader
generator seeded by (seed, epoch), so a resumed run
reproduces the uninterrupted one exactly on CPU in deterministic mode. The loop reports to
callbacks (:mod:`m2snet.training.callbacks`) and knows nothing of MLflow; checkpoints are
:class:`m2snet.models.checkpoint.Checkpoint` objects.
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

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, default_collate
from tqdm import tqdm

from m2snet import __version__, progress
from m2snet.common import M2SNetError, git_commit, resolve_device, seed_everything, write_json
from m2snet.data.cache import default_cache_dir
from m2snet.data.dataset import SegmentationDataset
from m2snet.evaluation.metrics import binary_metrics, multiclass_dice
from m2snet.evaluation.plots import learning_curves
from m2snet.models import create_model
from m2snet.models.checkpoint import Checkpoint, ResumeState, capture_rng_state, restore_rng_state
from m2snet.training.bn_recalibration import recalibrate_run_checkpoints
from m2snet.training.callbacks import CallbackLike, EpochEnd, TrainEnd, TrainStart, as_callbacks
from m2snet.training.cases import resolve_cases
from m2snet.training.config import LAST, SELECTED, TrainConfig
from m2snet.training.losses import TotalLoss
from m2snet.training.schedule import build_scheduler

log = logging.getLogger("m2snet.training")



@dataclass
class TrainResult:
    out_dir: Path
    checkpoint: Path  # model.pt, chosen by config.selection
    last_checkpoint: Path | None  # last.pt (resumable); None when config.keep_last_checkpoint is off
    history: list[dict[str, float]]
    selected_epoch: int
    selection_score: float  # the selected epoch's val_dice on the selection cases (or -train loss without)
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


class MultiScaleCollate:
    """Stack a batch, then resize the whole batch to one scale drawn from ``scales``.

    The scale comes from torch's global RNG: in the main process that RNG is checkpointed, and in
    DataLoader workers torch seeds it from the loader's generator, so the draws are reproducible.
    Images are resized bilinearly, masks with nearest neighbour (targets stay 0/1 or class ids).
    """

    def __init__(self, scales: Sequence[int]):
        self.scales = list(scales)

    def __call__(self, batch: list[dict[str, Any]]) -> dict[str, Any]:
        out = default_collate(batch)
        if len(self.scales) > 1:
            size = self.scales[int(torch.randint(len(self.scales), ()))]
            if size != out["image"].shape[-1]:
                out["image"] = F.interpolate(out["image"], size=(size, size), mode="bilinear",
                                             align_corners=False)
                mask = out["mask"]
                if mask.dtype == torch.long:  # class ids [B, H, W]
                    out["mask"] = F.interpolate(mask[:, None].float(), size=(size, size), mode="nearest")[:, 0].long()
                else:
                    out["mask"] = F.interpolate(mask, size=(size, size), mode="nearest")
        return out


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed of epoch ``epoch``'s shuffling generator: a function of (seed, epoch) only."""
    return (seed * 1_000_003 + epoch * 7919) % (2 ** 63 - 1)


def param_groups(model: torch.nn.Module, cfg: TrainConfig) -> list[dict[str, Any]]:
    """Backbone and head groups with their own max LR (the reference: 0.005 / 0.05)."""
    backbone = [p for p in model.backbone_parameters() if p.requires_grad]
    head = [p for p in model.head_parameters() if p.requires_grad]
    ids = {id(p) for p in backbone} | {id(p) for p in head}
    missing = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in ids]
    if missing:
        raise M2SNetError(f"model {cfg.model!r}: parameters in neither backbone nor head: {missing[:5]}")
    return [{"params": backbone, "lr": cfg.backbone_lr, "name": "backbone"},
            {"params": head, "lr": cfg.head_lr, "name": "head"}]


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig, on_cuda: bool) -> torch.optim.Optimizer:
    """SGD over :func:`param_groups`; ``fused_optimizer`` (CUDA) updates every tensor in one kernel."""
    return torch.optim.SGD(param_groups(model, cfg), lr=cfg.head_lr, momentum=cfg.momentum,
                           weight_decay=cfg.weight_decay, nesterov=cfg.nesterov,
                           fused=True if (cfg.fused_optimizer and on_cuda) else None)


class TrainStep:
    """One optimisation step: forward under autocast, total loss, backward, optimizer step.

    The trainer's loop and ``bench/train_speed.py`` both run this, so the bench times what trains.
    The speed knobs of :class:`TrainConfig` (channels_last, compile, fused optimizer) act on CUDA
    only; on CPU this is the plain eager step. Returns the detached loss terms without reading
    them back to the host, so that on CUDA the next step can be queued while this one runs.
    """

    def __init__(self, model: torch.nn.Module, loss_fn: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 cfg: TrainConfig, device: str) -> None:
        self.model, self.loss_fn, self.optimizer, self.cfg = model, loss_fn, optimizer, cfg
        self.device_type = device.split(":")[0]
        on_cuda = self.device_type == "cuda"
        self.amp = cfg.amp and on_cuda
        self.channels_last = cfg.channels_last and on_cuda
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp)
        if self.channels_last:  # in place: the optimizer keeps the same parameter objects
            model.to(memory_format=torch.channels_last)
        self.forward = model
        if cfg.compile and on_cuda:
            import torch._dynamo as dynamo

            # Static shapes: one graph per (batch size, scale); make room for all of them (the
            # default limit of 8 would silently fall back to eager for the later scales).
            n_shapes = 2 * len(cfg.scales())
            dynamo.config.cache_size_limit = max(dynamo.config.cache_size_limit, n_shapes + 2)
            self.forward = torch.compile(model, mode=cfg.compile_mode, dynamic=cfg.compile_dynamic)

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device_type=self.device_type, enabled=self.amp):
            logits = self.forward(x)
        losses = self.loss_fn(logits.float(), y)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(losses["loss"]).backward()
        if self.cfg.grad_clip:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return {k: v.detach() for k, v in losses.items()}


@dataclass
class EpochLosses:
    """One epoch's image-weighted loss sums. The loop adds each step's losses one step late, once the
    next step is queued, so reading them never stalls CUDA."""

    sums: dict[str, float] = field(default_factory=lambda: {"loss": 0.0, "structure": 0.0, "lossnet": 0.0})
    seen: int = 0

    def add(self, n: int, losses: dict[str, torch.Tensor]) -> float:
        """Add a step of ``n`` images; returns its total loss (not added when it is not finite)."""
        loss = float(losses["loss"])
        if math.isfinite(loss):
            self.seen += n
            for k in self.sums:
                if k in losses:
                    self.sums[k] += float(losses[k]) * n
        return loss

    def mean(self, key: str) -> float:
        return self.sums[key] / self.seen


def _account(totals: EpochLosses, step: int, n: int, losses: dict[str, torch.Tensor], *, epoch: int, bar, t0: float,
             out: Path, last_path: Path, optimizer: torch.optim.Optimizer) -> None:
    """Add a step to the epoch's totals and the progress bar; stop on a non-finite loss, naming where."""
    loss = totals.add(n, losses)
    if not math.isfinite(loss):
        lrs = f"backbone_lr={optimizer.param_groups[0]['lr']:.3g}, head_lr={optimizer.param_groups[1]['lr']:.3g}"
        raise M2SNetError(
            f"{out}: loss became {loss} at epoch {epoch + 1} step {step + 1} ({lrs}); "
            "lower the learning rates or check the data; the last good checkpoint is "
            f"{last_path if last_path.exists() else 'not written yet'}"
        )
    bar.set_postfix(loss=f"{totals.mean('loss'):.4f}", img_s=f"{totals.seen / (time.perf_counter() - t0):.1f}")


@torch.no_grad()
def validate(model, loader, loss_fn, device, n_classes: int, amp: bool) -> dict[str, float]:
    """Mean per-image Dice/IoU (threshold 0.5) and loss at the train size."""

    model.eval()
    dices, ious, losses = [], [], []
    for batch in loader:
        x = batch["image"].to(device, non_blocking=True)
        y = batch["mask"].to(device, non_blocking=True)
        with torch.autocast(device_type=device.split(":")[0], enabled=amp):
            logits = model(x)
        logits = logits.float()
        losses.append(float(loss_fn(logits, y)["loss"]) * x.shape[0])
        if n_classes == 1:
            pred = (torch.sigmoid(logits) >= 0.5).cpu().numpy()[:, 0]
            gt = (y > 0.5).cpu().numpy()[:, 0]
            for p, g in zip(pred, gt):
                m = binary_metrics(p, g)
                dices.append(m["dice"])
                ious.append(m["iou"])
        else:
            pred = logits.argmax(1).cpu().numpy()
            for p, g in zip(pred, y.cpu().numpy()):
                dices.append(multiclass_dice(p, g, n_classes)["dice"])
    model.train()
    n = max(1, len(dices))
    out = {"val_dice": float(np.mean(dices)), "val_loss": sum(losses) / n}
    if ious:
        out["val_iou"] = float(np.mean(ious))
    return out


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
    (``m2snet.mlops.tracking.tracking_callbacks``). With ``cfg.keep_last_checkpoint`` off, ``last.pt``
    is removed once the run has finished (a crash before that still leaves it to resume from).
    """


    cfg.validate()
    callbacks = as_callbacks(callbacks)
    out = Path(cfg.out_dir)
    last_path, model_path = out / LAST, out / SELECTED
    if resume and not last_path.is_file():
        raise M2SNetError(f"{last_path}: nothing to resume (no checkpoint); start without --resume")
    if not resume and last_path.exists():
        raise M2SNetError(f"{out}: already holds a run ({LAST}); use --resume to continue it or another --out")
    # Read (safely) before building data and model: a foreign or unsafe last.pt fails in a second.
    resumed = Checkpoint.load(last_path) if resume else None
    out.mkdir(parents=True, exist_ok=True)

    device = resolve_device(cfg.device)
    on_cuda = device.startswith("cuda")
    amp = cfg.amp and on_cuda
    seed_everything(cfg.seed, cfg.deterministic)

    cases = resolve_cases(cfg)
    info, train_ids, split_sha = cases.info, cases.train, cases.split_sha256
    val_ids = cases.epoch_val
    if cfg.selection == "fold_best":
        log.warning("selection=fold_best: the checkpoint is chosen on the cases the fold reports "
                    "(test-set selection); its metrics are optimistic")
    n_classes = info.n_classes
    cache_dir = None
    if cfg.cache:

        cache_dir = cfg.cache_dir or default_cache_dir()
    model_config = {"n_classes": n_classes, **cfg.model_config}
    model = create_model(cfg.model, pretrained=cfg.pretrained, **model_config).to(device)
    normalization = model.normalization  # the model's preprocessing: fed to the data, kept in the checkpoint
    train_ds = SegmentationDataset(info, train_ids, cfg.size, augment=cfg.augment, cache_dir=cache_dir,
                                   normalization=normalization)
    val_ds = SegmentationDataset(info, val_ids, cfg.size, augment=False, cache_dir=cache_dir,
                                 normalization=normalization) if val_ids else None

    loss_fn = TotalLoss(n_classes=n_classes, lossnet_weight=cfg.lossnet_weight,
                        lossnet_pretrained=cfg.lossnet_pretrained).to(device)
    pretrained_source = getattr(model, "pretrained_source", None)
    loss_source = getattr(loss_fn, "pretrained_source", None)
    optimizer = build_optimizer(model, cfg, on_cuda)
    steps_per_epoch = math.ceil(len(train_ds) / cfg.batch_size)
    total = cfg.epochs if cfg.schedule_unit == "epoch" else cfg.epochs * steps_per_epoch
    scheduler = build_scheduler(optimizer, cfg.schedule, total, cfg.warmup_fraction)
    train_step = TrainStep(model, loss_fn, optimizer, cfg, device)
    scaler, forward = train_step.scaler, train_step.forward

    dataset_version = info.version
    base_meta = {
        "model_name": cfg.model, "model_config": model_config, "n_classes": n_classes,
        "image_size": cfg.size, "normalization": normalization, "train_config": cfg.to_dict(),
        "pretrained_source": pretrained_source, "dataset_version": dataset_version,
        "split_sha256": split_sha, "fold": cfg.fold if cfg.split else None,
        "git_commit": git_commit(), "m2snet_version": __version__, "selection": cfg.selection,
        "mask_classes": getattr(info, "mask_classes", None),
    }

    history: list[dict[str, float]] = []
    selected = {"epoch": 0, "score": -math.inf}
    start_epoch = 0
    if resumed is not None:
        ckpt, resumed = resumed, None  # not held for the rest of the run
        if not ckpt.resumable:
            raise M2SNetError(f"{last_path}: a slim checkpoint (no optimizer/RNG state); it cannot be resumed")
        if ckpt.train_config != cfg.to_dict():
            diff = sorted(k for k, v in cfg.to_dict().items() if (ckpt.train_config or {}).get(k) != v)
            raise M2SNetError(
                f"{last_path}: config differs from the checkpoint's in {diff}; resume with the same config")
        state = ckpt.resume
        model.load_state_dict(ckpt.state_dict)
        optimizer.load_state_dict(state.optimizer)
        scheduler.load_state_dict(state.scheduler)
        scaler.load_state_dict(state.scaler)
        restore_rng_state(state.rng)
        history, selected, start_epoch = list(state.history), dict(state.selected), int(ckpt.epoch)
        log.info("resuming %s at epoch %d/%d", out, start_epoch + 1, cfg.epochs)
    cfg.save(out / "train_config.json")

    start = TrainStart(config=cfg, out_dir=out, device=device, start_epoch=start_epoch,
                       n_params=sum(p.numel() for p in model.parameters()), train_cases=train_ids,
                       epoch_val_cases=val_ids, reported_cases=cases.reported, dataset_version=dataset_version,
                       split_sha256=split_sha, pretrained_source=pretrained_source,
                       loss_pretrained_source=loss_source)
    for cb in callbacks:
        cb.on_train_start(start)

    collate = MultiScaleCollate(cfg.scales() if cfg.multiscale else [cfg.size])
    log.info("training %s on %d cases (%d val) for %d epochs on %s; scales %s; pretrained: %s",
             cfg.model, len(train_ids), len(val_ids), cfg.epochs, device, collate.scales, pretrained_source)
    model.train()
    for epoch in range(start_epoch, cfg.epochs):
        t0 = time.perf_counter()
        loader = DataLoader(train_ds, batch_size=cfg.batch_size, shuffle=True, num_workers=cfg.num_workers,
                            collate_fn=collate, pin_memory=on_cuda, drop_last=False,
                            generator=torch.Generator().manual_seed(epoch_seed(cfg.seed, epoch)))
        lrs = {f"lr_{g['name']}": g["lr"] for g in optimizer.param_groups}
        totals = EpochLosses()
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="batch", disable=not cfg.progress,
                   leave=False)
        pending = None  # (step, n, losses) of the previous step, read once the next one is queued
        for step, batch in enumerate(bar):
            x = batch["image"].to(device, non_blocking=True)
            y = batch["mask"].to(device, non_blocking=True)
            losses = train_step(x, y)
            if cfg.schedule_unit == "step":
                scheduler.step()
            if pending is not None:
                _account(totals, *pending, epoch=epoch, bar=bar, t0=t0, out=out, last_path=last_path,
                         optimizer=optimizer)
            pending = (step, x.shape[0], losses)
        if pending is not None:
            _account(totals, *pending, epoch=epoch, bar=bar, t0=t0, out=out, last_path=last_path,
                     optimizer=optimizer)
        bar.close()
        if cfg.schedule_unit == "epoch":
            scheduler.step()
        train_s = time.perf_counter() - t0
        row: dict[str, float] = {"epoch": epoch + 1, "train_loss": totals.mean("loss"),
                                 "train_structure": totals.mean("structure"),
                                 "train_lossnet": totals.mean("lossnet"), **lrs,
                                 "train_img_per_s": totals.seen / train_s}
        if val_ds is not None and ((epoch + 1) % cfg.val_every == 0 or epoch + 1 == cfg.epochs):
            val_loader = DataLoader(val_ds, batch_size=cfg.batch_size, shuffle=False,
                                    num_workers=cfg.num_workers, pin_memory=on_cuda,
                                    generator=torch.Generator().manual_seed(epoch_seed(cfg.seed, epoch) + 1))
            row.update(validate(forward, val_loader, loss_fn, device, n_classes, amp))
        row["epoch_seconds"] = time.perf_counter() - t0
        history.append(row)
        score = row.get("val_dice", -row["train_loss"])
        ckpt = Checkpoint(**base_meta, state_dict={k: v.detach().cpu() for k, v in model.state_dict().items()},
                          epoch=epoch + 1, metrics=row)
        final = epoch + 1 == cfg.epochs
        chosen = (final and cfg.selection == "final") or (cfg.selection != "final" and score > selected["score"])
        if chosen:
            selected = {"epoch": epoch + 1, "score": score}
            dataclasses.replace(ckpt, selected_epoch=epoch + 1).save(model_path)
        ckpt.resume = ResumeState(optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
                                  scaler=scaler.state_dict(), rng=capture_rng_state(), history=history,
                                  selected=selected)
        ckpt.save(last_path)
        log.info("epoch %d/%d: loss %.4f%s | %.1f img/s | %.1fs%s", epoch + 1, cfg.epochs, row["train_loss"],
                 "".join(f" {k} {row[k]:.4f}" for k in ("val_dice", "val_iou") if k in row),
                 row["train_img_per_s"], row["epoch_seconds"],
                 " *selected*" if selected["epoch"] == epoch + 1 else "")
        progress.emit("epoch", epoch=epoch + 1, epochs=cfg.epochs, loss=row["train_loss"], val_dice=row.get("val_dice"))
        end = EpochEnd(epoch + 1, cfg.epochs, row, out, checkpoint=last_path, selected=chosen)
        for cb in callbacks:
            cb.on_epoch_end(end)

    kept = (model_path, last_path) if cfg.keep_last_checkpoint else (model_path,)
    if cfg.recalibrate_bn:  # the saved weights' BatchNorm statistics, from their training cases

        recalibrate_run_checkpoints(kept, model, SegmentationDataset(
            info, train_ids, cfg.size, cache_dir=cache_dir, normalization=normalization), cfg.batch_size, cfg.seed,
            device, cfg.num_workers)
    if not cfg.keep_last_checkpoint:  # the run is complete: nothing left to resume
        last_path.unlink(missing_ok=True)
    write_json(out / "history.json", history)
    if history:

        learning_curves(history, out / "learning_curves.png", title=f"{cfg.model} fold {cfg.fold}")
    end_event = TrainEnd(config=cfg, out_dir=out, checkpoint=model_path, selected_epoch=int(selected["epoch"]),
                         selection_score=float(selected["score"]), history=history)
    for cb in callbacks:
        cb.on_train_end(end_event)
    return TrainResult(
        out_dir=out, checkpoint=model_path, last_checkpoint=last_path if cfg.keep_last_checkpoint else None,
        history=history,
        selected_epoch=int(selected["epoch"]), selection_score=float(selected["score"]), config=cfg,
        pretrained_source=pretrained_source, loss_pretrained_source=loss_source,
        dataset_version=dataset_version, split_sha256=split_sha, train_cases=train_ids,
        val_cases=cases.reported, selection_cases=val_ids, device=device,
    )
