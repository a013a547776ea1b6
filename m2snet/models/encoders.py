"""The Res2Net-50 v1b 26w4s encoder (timm ``res2net50d``) and its five feature levels."""

from __future__ import annotations

import os

import timm
import torch
from torch import nn

from m2snet.models.pretrained import load_pretrained, strip_prefixes

ENCODER_ARCH = "res2net50d"
# Channels of x1..x5 (x1 = stem after the max-pool, stride 4; x2..x5 = layer1..layer4).
ENCODER_CHANNELS = (64, 256, 512, 1024, 2048)


class Res2NetEncoder(nn.Module):
    """timm's ``res2net50d`` with its modules adopted as our own children.

    Adopting the children (instead of wrapping the timm model) keeps the state-dict keys exactly
    timm's (``conv1.0.weight``, ``layer1.0.convs.0.weight``, ..., ``fc.weight``), which are also the
    reference implementation's keys under ``resnet.``: timm and reference checkpoints load as they
    are. The classifier ``fc`` is unused but kept, as in the reference, so that its checkpoints
    load without remapping and the parameter count matches the reference's (29.74 M for M2SNet).
    """

    out_channels = ENCODER_CHANNELS

    def __init__(self, pretrained: bool | str | os.PathLike = True) -> None:
        super().__init__()
        net = timm.create_model(ENCODER_ARCH, pretrained=False)
        for name, child in net.named_children():
            self.add_module(name, child)
        self.pretrained_source = load_pretrained(
            self, pretrained, hub_id=net.pretrained_cfg["hf_hub_id"], what=f"encoder {ENCODER_ARCH}",
            key_filter=lambda sd: strip_prefixes(sd, ("module.", "resnet.", "encoder.")),
            ignore_missing=("fc.",),
        )

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """[x1, x2, x3, x4, x5] at strides 4, 4, 8, 16, 32."""
        x1 = self.maxpool(self.act1(self.bn1(self.conv1(x))))
        x2 = self.layer1(x1)
        x3 = self.layer2(x2)
        x4 = self.layer3(x3)
        x5 = self.layer4(x4)
        return [x1, x2, x3, x4, x5]
