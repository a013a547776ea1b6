"""One optimisation step and what it needs: the optimizer over the backbone and head parameter groups, the
step itself (autocast, loss, backward, update) and the epoch's loss totals."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from m2snet.errors import M2SNetError
from m2snet.training.config import TrainConfig
from m2snet.training.speed import step_precision


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
    ``amp`` and ``channels_last`` act where the device runs them fast (:func:`step_precision`: CUDA,
    or a CPU with native bf16 units, where autocast is bf16 and needs no loss scaling); compile and
    the fused optimizer act on CUDA only. Returns the detached loss terms without reading them back
    to the host, so that on CUDA the next step can be queued while this one runs.
    """

    def __init__(self, model: torch.nn.Module, loss_fn: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 cfg: TrainConfig, device: str) -> None:
        self.model, self.loss_fn, self.optimizer, self.cfg = model, loss_fn, optimizer, cfg
        self.device_type = device.split(":")[0]
        on_cuda = self.device_type == "cuda"
        self.precision = step_precision(device, cfg.amp, cfg.channels_last)
        self.amp, self.channels_last = self.precision.amp, self.precision.channels_last
        # Loss scaling is for fp16's narrow range (CUDA); bf16 has fp32's exponent and needs none.
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp and on_cuda)
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
        with torch.autocast(device_type=self.device_type, dtype=self.precision.dtype, enabled=self.amp):
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
