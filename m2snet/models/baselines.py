"""Baselines with the same Res2Net-50 encoder: the FPN of Tab. 7 and smp's U-Net / U-Net++."""

from __future__ import annotations

import os

import torch
from torch import nn

from m2snet.models.base import SegmentationModel
from m2snet.models.encoders import ENCODER_ARCH, Res2NetEncoder
from m2snet.models.m2snet import top_down_decode
from m2snet.models.pretrained import load_pretrained, strip_prefixes
from m2snet.models.units import ConvBNReLU


class FPN(SegmentationModel):
    """The Tab. 7 baseline: M2SNet without the subtraction pyramid.

    The reduced encoder levels feed the same top-down decoder directly (C4..C1 = x4r, x3r, x2r,
    x1), starting from the reduced x5; fusion is element-wise addition only.
    """

    def __init__(self, n_classes: int = 1, pretrained: bool | str | os.PathLike = True,
                 channels: int = 64) -> None:
        super().__init__()
        self.n_classes = n_classes
        self.resnet = Res2NetEncoder(pretrained)
        self.pretrained_source = self.resnet.pretrained_source
        _, c2, c3, c4, c5 = self.resnet.out_channels
        self.x5_dem_1 = ConvBNReLU(c5, channels)
        self.x4_dem_1 = ConvBNReLU(c4, channels)
        self.x3_dem_1 = ConvBNReLU(c3, channels)
        self.x2_dem_1 = ConvBNReLU(c2, channels)
        self.output4 = ConvBNReLU(channels, channels)
        self.output3 = ConvBNReLU(channels, channels)
        self.output2 = ConvBNReLU(channels, channels)
        self.output1 = nn.Sequential(nn.Conv2d(channels, n_classes, 3, padding=1))

    def backbone(self) -> nn.Module:
        return self.resnet

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1, x2, x3, x4, x5 = self.resnet(x)
        levels = (self.x4_dem_1(x4), self.x3_dem_1(x3), self.x2_dem_1(x2), x1)
        return top_down_decode(self, self.x5_dem_1(x5), levels, out_size=x)


class SMPModel(SegmentationModel):
    """segmentation-models-pytorch ``Unet`` / ``UnetPlusPlus`` on timm's ``res2net50d``.

    smp is always built with ``encoder_weights=None`` (smp would otherwise go to the network on
    its own terms); ImageNet weights go through our loader so offline behaviour is uniform.
    """

    def __init__(self, arch: str, n_classes: int = 1,
                 pretrained: bool | str | os.PathLike = True) -> None:
        super().__init__()
        import segmentation_models_pytorch as smp
        import timm

        self.n_classes = n_classes
        self.net = smp.create_model(arch, encoder_name=f"tu-{ENCODER_ARCH}", encoder_weights=None,
                                    in_channels=3, classes=n_classes)
        hub_id = timm.models.get_pretrained_cfg(ENCODER_ARCH).hf_hub_id
        self.pretrained_source = load_pretrained(
            self.net.encoder.model, pretrained, hub_id=hub_id, what=f"{arch} encoder {ENCODER_ARCH}",
            # the smp feature extractor drops the classifier: ignore fc.* in the weights file
            key_filter=lambda sd: {k: v for k, v in strip_prefixes(sd, ("module.", "resnet.")).items()
                                   if not k.startswith("fc.")},
        )

    def backbone(self) -> nn.Module:
        return self.net.encoder

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)
