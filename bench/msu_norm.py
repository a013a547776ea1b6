"""M2SNet's MSU filter statistics: shared (the reference) vs per call site, with and without
BatchNorm recalibration, on one fold of a real dataset.

Trains m2snet once per ``msu_norm`` (same seed, same batches: train mode is the same computation
in both modes) and scores the FINAL epoch's weights on the fold's validation cases at the train
size (Dice at 0.5, per image, mean):

- eval: the model as saved (filters on their running statistics);
- batch stats: the MSU filters' BatchNorms on each validation batch's own statistics, the rest in
  eval mode (what train mode computes; the yardstick for eval);
- recalibrated: ``recalibrate_bn`` over the fold's training cases (no augmentation, base size),
  in the run's own mode, and the shared run's weights upgraded to per-site then recalibrated.

    python bench/msu_norm.py --data /tmp/busi --split /tmp/busi.split-4fold-seed42.json \\
        --size 128 --epochs 6 --train-cases 128 --val-cases 96

Prints the table and the per-epoch validation Dice of each run; ``--out`` keeps the runs.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--split", required=True)
    ap.add_argument("--fold", type=int, default=0)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--train-cases", type=int, default=128)
    ap.add_argument("--val-cases", type=int, default=96)
    ap.add_argument("--lossnet-weight", type=float, default=0.0)
    ap.add_argument("--pretrained", default="false", help="false | true | PATH (encoder weights)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default="runs/bench_msu_norm")
    ap.add_argument("--json", help="also write the figures here")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")

    from m2snet.data.dataset import SegmentationDataset
    from m2snet.models import create_model
    from m2snet.models.checkpoint import Checkpoint
    from m2snet.training.bn_recalibration import mean_dice, recalibrate_bn, recalibration_loader
    from m2snet.training.cases import resolve_cases
    from m2snet.training.config import TrainConfig
    from m2snet.training.trainer import train

    pretrained = {"false": False, "true": True}.get(args.pretrained.lower(), args.pretrained)
    rows, curves = {}, {}
    for norm in ("shared", "per_site"):
        cfg = TrainConfig(data=args.data, split=args.split, fold=args.fold, model="m2snet",
                          model_config={"msu_norm": norm}, epochs=args.epochs, size=args.size,
                          batch_size=args.batch, max_train_cases=args.train_cases, max_val_cases=args.val_cases,
                          pretrained=pretrained, lossnet_weight=args.lossnet_weight, device=args.device,
                          out_dir=str(Path(args.out) / norm), progress=False, recalibrate_bn=False)
        t0 = time.perf_counter()
        result = train(cfg)
        seconds = time.perf_counter() - t0
        curves[norm] = [round(r["val_dice"], 4) for r in result.history]
        cases = resolve_cases(cfg)
        info, train_ids, val_ids = cases.info, cases.train, cases.reported
        ckpt = Checkpoint.load(result.last_checkpoint)
        val = SegmentationDataset(info, val_ids, args.size, normalization=ckpt.normalization)
        calib = recalibration_loader(SegmentationDataset(info, train_ids, args.size, normalization=ckpt.normalization),
                                     args.batch, cfg.seed)
        model = ckpt.build_model(device=args.device)
        row = {"eval": mean_dice(model, val, args.device, args.batch),
               "batch_stats": mean_dice(model, val, args.device, args.batch, filter_batch_stats=True)}
        recal = copy.deepcopy(model)
        recalibrate_bn(recal, calib, args.device)
        row["recalibrated"] = mean_dice(recal, val, args.device, args.batch)
        if norm == "shared":  # the same weights with per-site statistics (the upgrade path)
            upgraded = create_model("m2snet", pretrained=False, msu_norm="per_site").to(args.device)
            upgraded.load_state_dict(model.state_dict())
            row["eval_as_per_site_copied"] = mean_dice(upgraded, val, args.device, args.batch)
            recalibrate_bn(upgraded, calib, args.device)
            row["per_site_recalibrated"] = mean_dice(upgraded, val, args.device, args.batch)
        row["train_seconds"] = seconds
        rows[norm] = row
        print(f"{norm}: " + ", ".join(f"{k} {v:.4f}" for k, v in row.items()), flush=True)

    print(f"\nm2snet, fold {args.fold}, {args.size} px, {args.epochs} epochs, {args.train_cases} train / "
          f"{args.val_cases} val cases; final epoch's weights; mean Dice at 0.5 on the validation cases\n")
    print("| msu_norm (training) | eval | batch stats | eval - batch stats | recalibrated | "
          "per-site + recalibrated |")
    print("|---|---|---|---|---|---|")
    for norm, r in rows.items():
        upgraded = r.get("per_site_recalibrated", r["recalibrated"])
        print(f"| {norm} | {100 * r['eval']:.2f} | {100 * r['batch_stats']:.2f} | "
              f"{100 * (r['eval'] - r['batch_stats']):+.2f} | {100 * r['recalibrated']:.2f} | {100 * upgraded:.2f} |")
    print("\nper-epoch validation Dice (eval mode, as the trainer logs it):")
    for norm, curve in curves.items():
        print(f"  {norm:9s} {curve}")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "curves": curves, "args": vars(args)}, indent=2))


if __name__ == "__main__":
    main()
