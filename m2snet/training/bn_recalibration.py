"""BatchNorm recalibration ("precise BN"): re-estimate every running mean / variance of a model
from its training cases, for the weights it has now.

During training BatchNorm keeps an exponential average (momentum 0.1) of batch statistics taken
while the weights were still moving, on augmented, multi-scale batches. Recalibration resets the
statistics and averages them with equal weight (``momentum=None``) over forward passes in train
mode, without gradients, over the fold's training cases without augmentation at the base size;
momentum and eval mode are restored afterwards. Nothing else changes: no parameter moves.

For M2SNet with ``msu_norm="per_site"`` each call site of the shared MSU filters gets its own
statistic (the shared model has one statistic mixing all 20 sites, and recalibrating it does not
separate them). A reference checkpoint imported with ``m2snet convert-reference`` is upgraded with
``m2snet recalibrate-bn`` (per-site by default).

:func:`filter_batch_statistics` and :func:`mean_dice` measure what the filters' running statistics
cost: the Dice of the model in eval mode against the same model whose MSU filters normalise with
the batch's own statistics (the train-mode behaviour), everything else in eval mode.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.data import DataLoader, Dataset

from m2snet.data.dataset import SegmentationDataset
from m2snet.errors import M2SNetError
from m2snet.evaluation.metrics import binary_metrics
from m2snet.models.checkpoint import Checkpoint
from m2snet.models.units import OnesFilterBN
from m2snet.runtime import resolve_device
from m2snet.training.cases import resolve_cases
from m2snet.training.config import TrainConfig

log = logging.getLogger("m2snet.training")


@dataclass
class Recalibration:
    """What a recalibration saw; stored in the checkpoint under ``bn_recalibration``."""

    batches: int
    images: int
    size: int | None  # input side of the batches (None: not known / mixed)
    norms: int  # BatchNorm modules reset and re-estimated
    per_site_filters: int  # MSU filters whose statistics are per call site

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _images(batch: Any) -> torch.Tensor:
    if isinstance(batch, dict):
        return batch["image"]
    if isinstance(batch, (list, tuple)):
        return batch[0]
    return batch


@torch.no_grad()
def recalibrate_bn(model: nn.Module, loader: Iterable[Any], device: str | torch.device = "cpu") -> Recalibration:
    """Re-estimate every BatchNorm's running statistics of ``model`` over ``loader``'s images.

    ``loader`` yields batches (dicts with ``image``, (image, ...) tuples or tensors). BatchNorms
    that do not track running statistics are left alone. The model ends in eval mode.
    """
    norms = [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
    filters = [m for m in model.modules() if isinstance(m, OnesFilterBN)]
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average: every batch weighs the same
    for f in filters:
        f.reset_running_stats()  # also the per-site rows (and their "copied from shared" flag)
    model.train()
    batches = images = 0
    sizes = set()
    try:
        for batch in loader:
            x = _images(batch).to(device, non_blocking=True)
            model(x)
            batches += 1
            images += x.shape[0]
            sizes.add(int(x.shape[-1]))
    finally:
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
        model.eval()
    if batches == 0:
        raise M2SNetError("BatchNorm recalibration: no batches (no training cases?)")
    return Recalibration(batches=batches, images=images, size=sizes.pop() if len(sizes) == 1 else None,
                         norms=len(norms), per_site_filters=sum(f.per_site for f in filters))


def recalibration_loader(dataset: Dataset, batch_size: int, seed: int = 0, num_workers: int = 0) -> DataLoader:
    """Batches for :func:`recalibrate_bn`: a seeded shuffle (batches mix classes as in training;
    dataset files are often sorted by class), the last partial batch dropped when there is a full
    one (equal weights would give a few images a whole batch's say)."""
    return DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=num_workers,
                      drop_last=len(dataset) > batch_size,
                      generator=torch.Generator().manual_seed(seed))


def site_stats_inherited(model: nn.Module) -> bool:
    """True when a per-site MSU filter still holds statistics copied from a shared checkpoint."""
    return any(bool(f.site_stats_from_shared) for f in model.modules()
               if isinstance(f, OnesFilterBN) and f.per_site)


# --- batch-statistics evaluation --------------------------------------------------------------
@contextlib.contextmanager
def filter_batch_statistics(model: nn.Module) -> Iterator[nn.Module]:
    """Inside: the MSU filters' BatchNorms normalise with the batch's statistics (train-mode
    behaviour) and update nothing; every other module as it was. Restored on exit."""
    saved = []
    for f in model.modules():
        if isinstance(f, OnesFilterBN):
            saved.append((f.norm, f.norm.training, f.norm.track_running_stats))
            f.norm.train()
            f.norm.track_running_stats = False
    try:
        yield model
    finally:
        for norm, training, track in saved:
            norm.train(training)
            norm.track_running_stats = track


@torch.no_grad()
def mean_dice(model: nn.Module, dataset: Dataset, device: str | torch.device = "cpu", batch_size: int = 8,
              filter_batch_stats: bool = False) -> float:
    """Mean per-image Dice (threshold 0.5) of a binary model on ``dataset`` at its size, in eval
    mode; ``filter_batch_stats``: with the MSU filters on batch statistics (see above).

    With batch statistics the result depends on how the cases are batched: they are taken in the
    dataset's order, ``batch_size`` at a time (as the trainer's validation does)."""

    model.eval()
    dices = []
    context = filter_batch_statistics(model) if filter_batch_stats else contextlib.nullcontext()
    with context:
        for batch in DataLoader(dataset, batch_size=batch_size, shuffle=False):
            logits = model(batch["image"].to(device)).float()
            pred = (torch.sigmoid(logits) >= 0.5).cpu().numpy()[:, 0]
            gt = (batch["mask"] > 0.5).numpy()[:, 0]
            dices += [binary_metrics(p, g)["dice"] for p, g in zip(pred, gt)]
    return float(np.mean(dices))


# --- checkpoints ------------------------------------------------------------------------------
def recalibrate_into(ckpt: Checkpoint, model: nn.Module, loader: Iterable[Any],
                     device: str | torch.device) -> Checkpoint:
    """``ckpt`` with its weights loaded into ``model``, recalibrated, and written back (state_dict +
    ``bn_recalibration``)."""

    model.load_state_dict(ckpt.state_dict)
    model.to(device)
    info = recalibrate_bn(model, loader, device)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return dataclasses.replace(ckpt, state_dict=state, bn_recalibration=info.to_dict())


def recalibrate_run_checkpoints(paths: Sequence[str | os.PathLike], model: nn.Module, dataset: Dataset,
                                batch_size: int, seed: int, device: str | torch.device,
                                num_workers: int = 0) -> None:
    """Recalibrate each existing checkpoint of a finished run in place (the trainer's last step)."""

    loader = recalibration_loader(dataset, batch_size, seed, num_workers)
    for path in dict.fromkeys(Path(p) for p in paths):
        if not path.is_file():
            continue
        ckpt = recalibrate_into(Checkpoint.load(path), model, loader, device)
        ckpt.save(path)
        log.info("%s: BatchNorm statistics recalibrated over %d training cases (%d batches)",
                 path, ckpt.bn_recalibration["images"], ckpt.bn_recalibration["batches"])


@dataclass(frozen=True)
class RecalibrationOptions:
    """Over which cases and how :func:`recalibrate_checkpoint` re-estimates a checkpoint's BatchNorm statistics.

    The cases: fold ``fold``'s training cases of ``split`` (all cases of the data without a split), at most
    ``max_cases`` of them (drawn with ``seed``). ``msu_norm``: for models with MSU filters, the statistics
    mode of the result (``per_site`` upgrades a shared / reference checkpoint; None keeps the checkpoint's).
    ``size`` / ``batch_size`` default to the checkpoint's image size and training batch size.
    """

    split: str | os.PathLike | None = None
    fold: int = 0
    accept_split_version: str | None = None
    msu_norm: str | None = "per_site"
    size: int | None = None
    batch_size: int | None = None
    max_cases: int | None = None
    device: str = "auto"
    seed: int = 0


def recalibrate_checkpoint(
    checkpoint: str | os.PathLike,
    out: str | os.PathLike,
    *,
    data: str | os.PathLike,
    options: RecalibrationOptions = RecalibrationOptions(),
) -> tuple[Path, dict[str, Any]]:
    """Recalibrate a checkpoint file over the cases ``options`` name (:class:`RecalibrationOptions`) and
    write a slim checkpoint to ``out``. Returns (path written, the ``bn_recalibration`` record).
    """
    ckpt = Checkpoint.load(checkpoint).slim()
    config = dict(ckpt.model_config)
    if options.msu_norm is not None and "conv_3.norm.running_mean" in ckpt.state_dict:
        before = config.get("msu_norm", "the checkpoint's")
        config["msu_norm"] = options.msu_norm
        log.info("%s: msu_norm %s -> %s", checkpoint, before, options.msu_norm)
    ckpt.model_config = config
    try:
        model = ckpt.architecture()
    except ValueError as err:
        raise M2SNetError(f"{checkpoint}: {err}") from err
    train_cfg = ckpt.train_config or {}
    size = options.size or int(ckpt.image_size or train_cfg.get("size") or 352)
    batch_size = options.batch_size or int(train_cfg.get("batch_size") or 16)
    split = str(options.split) if options.split else None
    cfg = TrainConfig(data=str(data), split=split, fold=options.fold, max_train_cases=options.max_cases,
                      seed=options.seed, accept_split_version=options.accept_split_version)
    cases = resolve_cases(cfg)
    info, train_ids, split_sha = cases.info, cases.train, cases.split_sha256
    if info.n_classes != int(ckpt.n_classes):
        raise M2SNetError(f"{data}: {info.n_classes} classes, but {checkpoint} predicts {ckpt.n_classes}")
    device = resolve_device(options.device)
    dataset = SegmentationDataset(info, train_ids, size, augment=False, normalization=ckpt.normalization)
    try:
        ckpt = recalibrate_into(ckpt, model, recalibration_loader(dataset, batch_size, options.seed), device)
    except RuntimeError as err:
        raise M2SNetError(f"{checkpoint}: weights do not fit model {ckpt.model_name!r}: {err}") from err
    ckpt.bn_recalibration.update({
        "cases": len(train_ids), "source": str(checkpoint), "data": str(data), "dataset_version": info.version,
        "split": split,
        "split_sha256": split_sha, "fold": options.fold if split else None, "msu_norm": config.get("msu_norm"),
    })
    return ckpt.save(out), ckpt.bn_recalibration
