"""What the training loop is fed: each epoch's batches, a seeded function of (seed, epoch) so that a resumed
run sees the batches of the uninterrupted one, drawn at one scale per batch (multi-scale training)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate

from m2snet.training.config import TrainConfig


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


class TrainBatches(Sampler[list[int]]):
    """One epoch's training batches: a seeded shuffle of the ``n`` cases cut into ``batch_size`` chunks,
    except that a single leftover case joins the batch before it.

    BatchNorm in training needs more than one value per channel: a batch of one whose deepest feature
    map is 1x1 (``--size 32``) is an error, and at any size its statistics come from one image. Merging
    keeps every case in every epoch (unlike ``drop_last``) at the cost of one batch of ``batch_size + 1``.
    The order is ``torch.randperm`` on ``generator``, as torch's ``RandomSampler`` draws it, so every other
    batching equals ``BatchSampler(RandomSampler(...))``'s: runs without a leftover of one are unchanged.
    """

    def __init__(self, n: int, batch_size: int, generator: torch.Generator):
        self.n, self.batch_size, self.generator = n, batch_size, generator

    def __iter__(self):
        order = torch.randperm(self.n, generator=self.generator).tolist()
        batches = [order[i:i + self.batch_size] for i in range(0, self.n, self.batch_size)]
        if len(batches) > 1 and len(batches[-1]) == 1:
            leftover = batches.pop()
            batches[-1] += leftover
        yield from batches

    def __len__(self) -> int:
        full, rest = divmod(self.n, self.batch_size)
        return full + (1 if rest > 1 or (rest == 1 and full == 0) else 0)


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed of epoch ``epoch``'s shuffling generator: a function of (seed, epoch) only."""
    return (seed * 1_000_003 + epoch * 7919) % (2 ** 63 - 1)

def epoch_loader(dataset: Dataset, cfg: TrainConfig, index: int, *, shuffle: bool, collate: MultiScaleCollate,
                 on_cuda: bool) -> DataLoader:
    """Epoch ``index``'s loader: training batches (``shuffle``, :class:`TrainBatches` through ``collate``) or
    the validation cases in order."""
    # The order (and the scale draws) come from a generator seeded by (seed, epoch): a resumed
    # run sees the same batches as the uninterrupted one.
    seed = epoch_seed(cfg.seed, index) + (0 if shuffle else 1)
    generator = torch.Generator().manual_seed(seed)
    if shuffle:  # training: never a batch of one (TrainBatches); one generator orders batches and seeds workers
        return DataLoader(dataset, batch_sampler=TrainBatches(len(dataset), cfg.batch_size, generator),
                          num_workers=cfg.num_workers, collate_fn=collate, pin_memory=on_cuda,
                          generator=generator)
    return DataLoader(dataset, batch_size=cfg.batch_size, shuffle=False, num_workers=cfg.num_workers,
                      pin_memory=on_cuda, drop_last=False, generator=generator)
