"""Losses: the structure loss (weighted BCE + weighted IoU), LossNet, and their sum ``TotalLoss``.

Binary (``n_classes == 1``), as the spec / reference:
    w    = 1 + 5 * |avgpool31(m) - m|                          (boundary-weighted pixels)
    wBCE = sum(w * bce(logit, m)) / sum(w)                      per image
    wIoU = 1 - (sum(w p m) + 1) / (sum(w (p + m)) - sum(w p m) + 1),  p = sigmoid(logit)
    L    = mean_batch(wBCE + wIoU) + lambda * LossNet(p, m),  lambda = 0.1

Multi-class (``n_classes > 1``, target = class ids), our counterpart of the same idea:
    w    = 1 + 5 * max_{c>=1} |avgpool31(m_c) - m_c| over the foreground one-hot maps m_c
    wCE  = sum(w * ce) / sum(w)                                 per image (softmax cross-entropy)
    wIoU = mean over foreground classes c >= 1 of the binary wIoU of (softmax_c, m_c)
    LossNet on the per-class probability maps of the foreground classes (``lossnet_on="per_class"``,
    each class map compared with its one-hot mask; all classes in one batched VGG pass) or on the
    foreground map 1 - p_background vs (m > 0) (``lossnet_on="foreground"``, one map, cheaper).
With two classes this is the binary loss written with a softmax.
"""

from __future__ import annotations

import os
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from m2snet.models.pretrained import load_pretrained, strip_prefixes

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# VGG-16 ``features`` slices ending at relu1_2, relu2_2, relu3_3, relu4_3.
VGG_SLICES = ((0, 4), (4, 9), (9, 16), (16, 23))
VGG_HUB_ID = "timm/vgg16.tv_in1k"


def boundary_weight(mask: torch.Tensor, kernel: int = 31, gain: float = 5.0) -> torch.Tensor:
    """w = 1 + gain * |avgpool_k(mask) - mask|; ``mask`` [B, C, H, W] -> w [B, 1, H, W] (max over C)."""
    local = F.avg_pool2d(mask, kernel_size=kernel, stride=1, padding=kernel // 2)
    return 1 + gain * torch.abs(local - mask).amax(dim=1, keepdim=True)


def weighted_iou(prob: torch.Tensor, mask: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Per image and channel: 1 - (sum(w p m) + 1) / (sum(w (p + m)) - sum(w p m) + 1) -> [B, C]."""
    inter = (weight * prob * mask).sum(dim=(2, 3))
    union = (weight * (prob + mask)).sum(dim=(2, 3))
    return 1 - (inter + 1) / (union - inter + 1)


def structure_loss(logits: torch.Tensor, mask: torch.Tensor, weighted_bce: bool = True) -> torch.Tensor:
    """Binary structure loss (PraNet / F3Net), mean over the batch.

    ``weighted_bce=False`` reproduces the reference script, whose ``reduce='none'`` argument makes
    the BCE a plain (unweighted) mean over all pixels of the batch.
    """
    logits, mask = logits.float(), mask.float()
    w = boundary_weight(mask)
    if weighted_bce:
        bce = F.binary_cross_entropy_with_logits(logits, mask, reduction="none")
        bce = (w * bce).sum(dim=(2, 3)) / w.sum(dim=(2, 3))
    else:
        bce = F.binary_cross_entropy_with_logits(logits, mask)
    return (bce + weighted_iou(torch.sigmoid(logits), mask, w)).mean()


def multiclass_structure_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Multi-class counterpart (see the module docstring); ``target`` long [B, H, W]."""
    logits = logits.float()
    n_classes = logits.shape[1]
    onehot = F.one_hot(target, n_classes).permute(0, 3, 1, 2).float()
    # Boundaries of the foreground classes only: the background map is 1 at the image border,
    # where the zero-padded average pool would otherwise invent a boundary. With two classes
    # this makes the loss exactly the binary one.
    w = boundary_weight(onehot[:, 1:])
    ce = F.cross_entropy(logits, target, reduction="none").unsqueeze(1)
    wce = (w * ce).sum(dim=(2, 3)) / w.sum(dim=(2, 3))
    prob = torch.softmax(logits, dim=1)
    wiou = weighted_iou(prob[:, 1:], onehot[:, 1:], w).mean(dim=1, keepdim=True)
    return (wce + wiou).mean()


def vgg16_features() -> nn.Sequential:
    """VGG-16 ``features`` up to relu4_3 (indices as torchvision / timm, so their weights load)."""
    from torchvision.models.vgg import cfgs, make_layers

    return make_layers(cfgs["D"])[: VGG_SLICES[-1][1]]


class LossNet(nn.Module):
    """Training-free loss network: a frozen ImageNet VGG-16 compares prediction and mask features.

    L_f = sum over the four slices of MSE(features(pred), features(mask)); inputs are maps in
    [0, 1] repeated to 3 channels, ImageNet-normalised, resized to ``size`` x ``size``.
    The VGG never trains: its parameters have ``requires_grad=False`` (no grads accumulate) and
    it stays in eval mode whatever ``train()`` is called with; the mask branch runs without grad.
    """

    def __init__(self, pretrained: bool | str | os.PathLike = True, size: int = 224) -> None:
        super().__init__()
        self.size = size
        self.features = vgg16_features()
        self.pretrained_source = load_pretrained(
            self.features, pretrained, hub_id=VGG_HUB_ID, what="LossNet VGG-16",
            # timm / torchvision VGG-16 files: keep features.<i> up to relu4_3, drop the classifier
            key_filter=_vgg_features_filter,
        )
        self.features.requires_grad_(False)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.features.eval()

    def train(self, mode: bool = True) -> "LossNet":
        super().train(mode)
        self.features.eval()  # frozen network: never batch-norm / dropout training behaviour
        return self

    def _slices(self, maps: torch.Tensor) -> list[torch.Tensor]:
        x = F.interpolate(maps, size=(self.size, self.size), mode="bilinear", align_corners=False)
        x = (x.expand(-1, 3, -1, -1) - self.mean) / self.std
        feats = []
        for start, stop in VGG_SLICES:
            x = self.features[start:stop](x)
            feats.append(x)
        return feats

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """``pred`` / ``target``: [N, 1, H, W] maps in [0, 1]."""
        with torch.no_grad():
            target_feats = self._slices(target.to(pred.dtype))
        return sum(F.mse_loss(p, t) for p, t in zip(self._slices(pred), target_feats))


def _vgg_features_filter(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    state = strip_prefixes(state, ("module.", "vgg.", "features."))
    stop = VGG_SLICES[-1][1]
    return {k: v for k, v in state.items() if k.split(".")[0].isdigit() and int(k.split(".")[0]) < stop}


class TotalLoss(nn.Module):
    """L = structure + lossnet_weight * LossNet; ``forward(logits, target) -> dict``.

    Returns ``{"loss": total (backprop this), "structure": ..., "lossnet": ...}`` (tensors).
    ``target``: float [B, 1, H, W] in {0, 1} for ``n_classes == 1``, long [B, H, W] otherwise.
    ``lossnet_weight=0`` builds no VGG at all. The module follows ``logits`` to its device.
    """

    def __init__(
        self,
        n_classes: int = 1,
        lossnet_weight: float = 0.1,
        lossnet_pretrained: bool | str | os.PathLike = True,
        weighted_bce: bool = True,
        lossnet_size: int = 224,
        lossnet_on: Literal["per_class", "foreground"] = "per_class",
    ) -> None:
        super().__init__()
        if n_classes < 1:
            raise ValueError(f"n_classes must be >= 1, got {n_classes}")
        if lossnet_on not in ("per_class", "foreground"):
            raise ValueError(f"lossnet_on must be 'per_class' or 'foreground', got {lossnet_on!r}")
        self.n_classes, self.lossnet_weight = n_classes, float(lossnet_weight)
        self.weighted_bce, self.lossnet_on = weighted_bce, lossnet_on
        self.lossnet = LossNet(lossnet_pretrained, lossnet_size) if self.lossnet_weight > 0 else None
        self.pretrained_source = self.lossnet.pretrained_source if self.lossnet is not None else None

    def _maps(self, logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Probability maps and their masks for LossNet, as [N, 1, H, W]."""
        if self.n_classes == 1:
            return torch.sigmoid(logits), target.float()
        prob = torch.softmax(logits.float(), dim=1)
        if self.lossnet_on == "foreground":
            return 1 - prob[:, :1], (target > 0).float().unsqueeze(1)
        onehot = F.one_hot(target, self.n_classes).permute(0, 3, 1, 2).float()
        return prob[:, 1:].reshape(-1, 1, *prob.shape[2:]), onehot[:, 1:].reshape(-1, 1, *prob.shape[2:])

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
        if logits.shape[1] != self.n_classes:
            raise ValueError(f"logits have {logits.shape[1]} channels, TotalLoss expects {self.n_classes}")
        if self.n_classes == 1:
            structure = structure_loss(logits, target, self.weighted_bce)
        else:
            structure = multiclass_structure_loss(logits, target.long())
        if self.lossnet is None:
            lossnet = structure.new_zeros(())
        else:
            if self.lossnet.mean.device != logits.device:
                self.lossnet.to(logits.device)
            lossnet = self.lossnet(*self._maps(logits, target))
        return {"loss": structure + self.lossnet_weight * lossnet, "structure": structure,
                "lossnet": lossnet}
