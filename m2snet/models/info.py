"""Parameter counts and multiply-accumulates of a registered model."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from m2snet.models import create_model


@dataclass
class ModelInfo:
    name: str
    input_size: int
    n_classes: int
    trainable_params: int
    fixed_params: int  # parameters with requires_grad=False (e.g. nothing in the fast MSU)
    gmacs: float  # per image, forward, counted by torch.utils.flop_counter (MACs = FLOPs / 2)
    config: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def count_macs(model: torch.nn.Module, size: int, batch: int = 1) -> float:
    """Forward MACs per image at ``size`` x ``size``, via FlopCounterMode (eval mode, no grad).

    The counter sees convolutions and matmuls; elementwise ops, pooling and batch norm are free
    there, as in the reference figures we compare with (MSNet 16.84 GMACs at 352).
    """
    was_training = model.training
    model.eval()
    param = next(model.parameters())
    x = torch.zeros(batch, 3, size, size, device=param.device, dtype=param.dtype)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(x)
    model.train(was_training)
    return counter.get_total_flops() / 2 / batch


def model_info(name: str, size: int = 352, n_classes: int = 1, **config: Any) -> ModelInfo:
    config = {"pretrained": False, **config}
    model = create_model(name, n_classes=n_classes, **config)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    fixed = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    return ModelInfo(name=name, input_size=size, n_classes=n_classes, trainable_params=trainable,
                     fixed_params=fixed, gmacs=count_macs(model, size) / 1e9,
                     config={**{k: v for k, v in config.items() if k != "pretrained"}, **_modes(model)})


def _modes(model: torch.nn.Module) -> dict[str, Any]:
    """Options that change what the model computes even at their default (listed by model-info)."""
    return {"msu_norm": model.msu_norm} if hasattr(model, "msu_norm") else {}
