"""What every segmentation model of the registry offers the trainer."""

from __future__ import annotations

from typing import Iterator

from torch import nn

from m2snet.models.preprocessing import DEFAULT_NORMALIZATION, Normalization


class SegmentationModel(nn.Module):
    """Base class: ``forward(x) -> logits [B, n_classes, H, W]`` at the input size.

    Subclasses set ``self.n_classes``, ``self.pretrained_source`` (None = random init, a warning
    was logged) and return their pretrained part from :meth:`backbone`. The trainer gives the
    backbone and the rest separate learning rates (reference: 0.005 and 0.05). ``normalization`` is
    the input preprocessing the model expects; the trainer records it in the checkpoint.
    """

    n_classes: int
    pretrained_source: str | None
    normalization: Normalization = DEFAULT_NORMALIZATION

    def backbone(self) -> nn.Module:
        raise NotImplementedError

    def backbone_parameters(self) -> Iterator[nn.Parameter]:
        return (p for p in self.backbone().parameters() if p.requires_grad)

    def head_parameters(self) -> Iterator[nn.Parameter]:
        backbone_ids = {id(p) for p in self.backbone().parameters()}
        return (p for p in self.parameters() if p.requires_grad and id(p) not in backbone_ids)
