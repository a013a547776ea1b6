"""Registered model names -> constructors."""

from __future__ import annotations

from typing import Any

from m2snet.models.baselines import FPN, SMPModel
from m2snet.models.m2snet import M2SNet
from m2snet.models.registry import register_architecture


@register_architecture("m2snet")
def m2snet(**config: Any) -> M2SNet:
    """M2SNet: multi-scale subtraction units (MSU) in the inter-layer pyramid."""
    return M2SNet(unit="msu", **config)


@register_architecture("msnet")
def msnet(**config: Any) -> M2SNet:
    """MSNet (MICCAI version): single-scale subtraction units (SU)."""
    return M2SNet(unit="su", **config)


@register_architecture("m2snet_au")
def m2snet_au(**config: Any) -> M2SNet:
    """Tab. 7 "AU": element-wise addition units in place of the subtraction units."""
    return M2SNet(unit="au", **config)


@register_architecture("m2snet_aspp")
def m2snet_aspp(**config: Any) -> M2SNet:
    """Tab. 8 "M2SNet (ASPP)": multi-scale units from learnable ASPP branches."""
    return M2SNet(unit="aspp", **config)


@register_architecture("m2snet_denseaspp")
def m2snet_denseaspp(**config: Any) -> M2SNet:
    """Tab. 8 "M2SNet (DenseASPP)": multi-scale units from learnable DenseASPP branches."""
    return M2SNet(unit="denseaspp", **config)


@register_architecture("fpn")
def fpn(**config: Any) -> FPN:
    """Tab. 7 baseline: FPN-style top-down addition on the same encoder."""
    return FPN(**config)


@register_architecture("unet")
def unet(**config: Any) -> SMPModel:
    """smp U-Net with the Res2Net-50 (res2net50d) encoder."""
    return SMPModel("unet", **config)


@register_architecture("unetplusplus")
def unetplusplus(**config: Any) -> SMPModel:
    """smp U-Net++ with the Res2Net-50 (res2net50d) encoder."""
    return SMPModel("unetplusplus", **config)
