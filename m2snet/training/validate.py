"""The per-epoch validation pass: mean per-image Dice/IoU and loss at the train size."""

from __future__ import annotations

import numpy as np
import torch

from m2snet.evaluation.metrics import binary_metrics, multiclass_dice


@torch.no_grad()
def validate(model, loader, loss_fn, device, n_classes: int, amp: bool) -> dict[str, float]:
    """Mean per-image Dice/IoU (threshold 0.5) and loss at the train size."""

    model.eval()
    dices, ious, losses = [], [], []
    for batch in loader:
        x = batch["image"].to(device, non_blocking=True)
        y = batch["mask"].to(device, non_blocking=True)
        with torch.autocast(device_type=device.split(":")[0], enabled=amp):
            logits = model(x)
        logits = logits.float()
        losses.append(float(loss_fn(logits, y)["loss"]) * x.shape[0])
        if n_classes == 1:
            pred = (torch.sigmoid(logits) >= 0.5).cpu().numpy()[:, 0]
            gt = (y > 0.5).cpu().numpy()[:, 0]
            for p, g in zip(pred, gt):
                m = binary_metrics(p, g)
                dices.append(m["dice"])
                ious.append(m["iou"])
        else:
            pred = logits.argmax(1).cpu().numpy()
            for p, g in zip(pred, y.cpu().numpy()):
                dices.append(multiclass_dice(p, g, n_classes)["dice"])
    model.train()
    n = max(1, len(dices))
    out = {"val_dice": float(np.mean(dices)), "val_loss": sum(losses) / n}
    if ious:
        out["val_iou"] = float(np.mean(ious))
    return out
