"""M2SNet / MSNet: the Res2Net encoder, the inter-layer fusion pyramid and the top-down decoder.

One implementation for the whole family; the fusion unit (SU, MSU, AU, ASPP or DenseASPP
variants, see :mod:`m2snet.models.units`) is the parameter. Attribute names are the reference
implementation's (``x5_dem_1``, ``x5_x4``, ..., ``output1``) so its checkpoints load key for key.
"""

from __future__ import annotations

import os
from typing import Literal

import torch
from torch import nn

from m2snet.models.base import SegmentationModel
from m2snet.models.encoders import Res2NetEncoder
from m2snet.models.units import (
    ASPPSubtraction,
    Combine,
    ConvBNReLU,
    DenseASPPSubtraction,
    FusionUnit,
    MSUImpl,
    MSUNorm,
    MultiScaleSubtraction,
    OnesFilterBN,
    addition,
    subtraction,
    upsample_to,
)

UnitKind = Literal["msu", "su", "au", "aspp", "denseaspp"]
# The shared filters' initial BatchNorm scale when the encoder starts from random weights (the
# reference's 1.0 with pretrained weights); measured on BUSI, docs/study-busi.md.
RANDOM_INIT_MSU_GAMMA = 0.1
# per_site: measured on BUSI (docs/model.md, "MSU filter statistics"); "shared" is the reference.
DEFAULT_MSU_NORM: MSUNorm = "per_site"

# The pyramid, in the order the reference registers it: (unit name, deeper input, shallower input).
# Inputs name the reduced encoder levels x1..x5 or earlier units' outputs.
PYRAMID: tuple[tuple[str, str, str], ...] = (
    ("x5_x4", "x5", "x4"), ("x4_x3", "x4", "x3"), ("x3_x2", "x3", "x2"), ("x2_x1", "x2", "x1"),
    ("x5_x4_x3", "x5_x4", "x4_x3"), ("x4_x3_x2", "x4_x3", "x3_x2"), ("x3_x2_x1", "x3_x2", "x2_x1"),
    ("x5_x4_x3_x2", "x5_x4_x3", "x4_x3_x2"), ("x4_x3_x2_x1", "x4_x3_x2", "x3_x2_x1"),
    # order 4: the deeper input first goes through the extra CBR x5_dem_4 (see forward)
    ("x5_x4_x3_x2_x1", "x5_x4_x3_x2", "x4_x3_x2_x1"),
)
# Complementarity-enhanced features: C_l = CBR(sum of these) (C4 = x5_x4 has no CBR).
LEVELS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("level3", ("x4_x3", "x5_x4_x3")),
    ("level2", ("x3_x2", "x4_x3_x2", "x5_x4_x3_x2")),
    ("level1", ("x2_x1", "x3_x2_x1", "x4_x3_x2_x1", "x5_x4_x3_x2_x1")),
)


class M2SNet(SegmentationModel):
    """Multi-scale in multi-scale subtraction network (and MSNet with ``unit="su"``).

    Args:
        n_classes: output channels (1 = binary logits; >1 = per-class logits).
        unit: the fusion unit, ``"msu"`` (M2SNet), ``"su"`` (MSNet), ``"au"`` (addition units,
            Tab. 7), ``"aspp"`` / ``"denseaspp"`` (Tab. 8).
        pretrained: True (hub), a local weights file, or False (random).
        msu_impl: ``"fast"`` (one-channel box filter) or ``"dense"`` (all-ones 64x64xkxk conv);
            only for ``unit="msu"``; both give the same numbers.
        msu_norm: ``"per_site"`` (default: one running mean / variance per call site of the
            shared filters, 10 units x 2 inputs) or ``"shared"`` (the reference: one for all 20
            calls); only for ``unit="msu"``. Same parameters and training; see docs/model.md.
        msu_bn_momentum: the running-statistics momentum of the shared filters' BatchNorm (0.1,
            PyTorch's default and the reference's; None = cumulative average); only for ``unit="msu"``.
        msu_gamma_init: the initial scale (BatchNorm weight) of the shared filters' outputs. None (default):
            1.0, PyTorch's and the reference's, when the encoder starts from pretrained weights, and
            :data:`RANDOM_INIT_MSU_GAMMA` (0.1) when it starts from random weights (why, as measured on
            BUSI: docs/study-busi.md). Only for ``unit="msu"``; init only (a checkpoint's weights win).
    """

    def __init__(
        self,
        n_classes: int = 1,
        unit: UnitKind = "msu",
        pretrained: bool | str | os.PathLike = True,
        msu_impl: MSUImpl = "fast",
        msu_norm: MSUNorm = DEFAULT_MSU_NORM,
        channels: int = 64,
        msu_bn_momentum: float | None = 0.1,
        msu_gamma_init: float | None = None,
    ) -> None:
        super().__init__()
        if n_classes < 1:
            raise ValueError(f"n_classes must be >= 1, got {n_classes}")
        self.n_classes, self.unit = n_classes, unit
        self.resnet = Res2NetEncoder(pretrained)
        self.pretrained_source = self.resnet.pretrained_source
        c1, c2, c3, c4, c5 = self.resnet.out_channels
        assert c1 == channels, "x1 enters the pyramid unreduced, so it must have `channels` channels"

        if unit == "msu":
            # One F3 and one F5 for the whole network, as in the reference (per_site: with one
            # running statistic per call site, the two inputs of each of the pyramid's units).
            self.msu_norm = msu_norm
            sites = 2 * len(PYRAMID)
            self.conv_3 = OnesFilterBN(3, channels, msu_impl, msu_norm, sites, msu_bn_momentum)
            self.conv_5 = OnesFilterBN(5, channels, msu_impl, msu_norm, sites, msu_bn_momentum)
            if msu_gamma_init is None:
                msu_gamma_init = 1.0 if self.pretrained_source else RANDOM_INIT_MSU_GAMMA
            for f in (self.conv_3, self.conv_5):
                nn.init.constant_(f.norm.weight, msu_gamma_init)
        elif msu_impl != "fast":
            raise ValueError(f"msu_impl={msu_impl!r} only applies to unit='msu', not {unit!r}")
        elif msu_norm != DEFAULT_MSU_NORM:
            raise ValueError(f"msu_norm={msu_norm!r} only applies to unit='msu', not {unit!r}")

        self.x5_dem_1 = ConvBNReLU(c5, channels)
        self.x4_dem_1 = ConvBNReLU(c4, channels)
        self.x3_dem_1 = ConvBNReLU(c3, channels)
        self.x2_dem_1 = ConvBNReLU(c2, channels)
        for index, (name, _, _) in enumerate(PYRAMID[:-1]):
            self.add_module(name, FusionUnit(self._combine(unit, channels, index), channels))
        self.x5_dem_4 = ConvBNReLU(channels, channels)
        name = PYRAMID[-1][0]
        self.add_module(name, FusionUnit(self._combine(unit, channels, len(PYRAMID) - 1), channels))
        for name, _ in LEVELS:
            self.add_module(name, ConvBNReLU(channels, channels))
        self.x5_dem_5 = ConvBNReLU(c5, channels)
        self.output4 = ConvBNReLU(channels, channels)
        self.output3 = ConvBNReLU(channels, channels)
        self.output2 = ConvBNReLU(channels, channels)
        self.output1 = nn.Sequential(nn.Conv2d(channels, n_classes, 3, padding=1))

    def _combine(self, unit: UnitKind, channels: int, index: int) -> Combine:
        if unit == "msu":
            return MultiScaleSubtraction((self.conv_3, self.conv_5), unit=index)
        if unit == "su":
            return subtraction
        if unit == "au":
            return addition
        if unit == "aspp":
            return ASPPSubtraction(channels)
        if unit == "denseaspp":
            return DenseASPPSubtraction(channels)
        raise ValueError(f"unknown fusion unit {unit!r} (msu, su, au, aspp, denseaspp)")

    def backbone(self) -> nn.Module:
        return self.resnet

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1, x2, x3, x4, x5 = self.resnet(x)
        f = {
            "x5": self.x5_dem_1(x5), "x4": self.x4_dem_1(x4), "x3": self.x3_dem_1(x3),
            "x2": self.x2_dem_1(x2), "x1": x1,
        }
        for name, deeper, shallower in PYRAMID:
            a = f[deeper]
            if name == PYRAMID[-1][0]:
                a = self.x5_dem_4(a)
            f[name] = getattr(self, name)(a, f[shallower])
        c4 = f["x5_x4"]
        c3, c2, c1 = (getattr(self, level)(sum(f[k] for k in keys)) for level, keys in LEVELS)
        return top_down_decode(self, self.x5_dem_5(x5), (c4, c3, c2, c1), out_size=x)


def top_down_decode(net: nn.Module, top: torch.Tensor, levels: tuple[torch.Tensor, ...],
                    out_size: torch.Tensor) -> torch.Tensor:
    """O4 = output4(up(top) + C4); O3 = output3(up(O4) + C3); ...; logits = up(output1(...)).

    Shared by M2SNet and the FPN baseline: both name their blocks ``output4`` .. ``output1``.
    """
    o = top
    for block, c in zip((net.output4, net.output3, net.output2, net.output1), levels):
        o = block(upsample_to(o, c) + c)
    return upsample_to(o, out_size)
