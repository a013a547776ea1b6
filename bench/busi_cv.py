"""Four-fold cross-validation on the real BUSI set for several models under one shared budget.

    python bench/busi_cv.py                       # CPU: a tiny budget (64 px, 1 epoch, 16 cases/fold)
    python bench/busi_cv.py --size 352 --epochs 6 --batch 16   # a short GPU run (< 8 min on one H100)
    python bench/busi_cv.py --full                # the paper's recipe (352 px, 50 epochs, all cases)

BUSI (/work/shared/data/busi or --busi) is imported once through m2snet.data into a cached dataset
directory (--work), split into four folds stratified by class, and every model is trained and
evaluated on the same folds. The table prints the paper's BUSI columns (Jaccard, Precision,
Recall, Specificity, Dice; mean ± std over folds, percent) next to the paper's M2SNet row
(Tab. 4) and the all-background baseline (predict "no lesion" everywhere: Dice 1 on normal
images, 0 elsewhere, by the empty-mask convention of m2snet.evaluation.metrics).

ImageNet weights are used when available (hub or --pretrained FILE); otherwise the models start
from random weights (a warning is logged) and the numbers are not comparable with the paper's.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_BUSI = Path(os.environ.get("M2SNET_BUSI_ROOT", REPO.parent / "shared" / "data" / "busi"))


def import_busi(src: Path, work: Path, seed: int, validate: bool = True):
    """The BUSI dataset dir + 4-fold split under ``work`` (re-used when already there)."""
    from m2snet.data.format import load_dataset
    from m2snet.data.importers import import_dataset
    from m2snet.data.split import make_split

    dest = work / "busi"
    if not (dest / "manifest.csv").is_file():
        import_dataset("busi", src, dest, progress=True, validate=validate)
    info = load_dataset(dest)
    split_path = work / f"busi.split-4fold-seed{seed}.json"
    if not split_path.is_file():
        make_split(info, n_folds=4, seed=seed, out=split_path)
    return info, split_path


def background_baseline(info, split_path: Path, folds: list[int], val_cases: int | None,
                        seed: int) -> dict[str, tuple[float, float]]:
    """Metrics of predicting an empty mask everywhere on the same validation cases the models see.

    By the empty-mask convention a normal (empty) case scores 1 on every ratio and a lesion case 0;
    specificity is 1 everywhere (no false positives).
    """
    import numpy as np

    from m2snet.cv import aggregate_cv
    from m2snet.training.config import TrainConfig
    from m2snet.training.trainer import resolve_cases

    area = {c.case_id: c.lesion_area for c in info.cases}
    per_fold = []
    for k in folds:
        _, _, val, _ = resolve_cases(TrainConfig(data=str(info.root), split=str(split_path), fold=k,
                                                 max_val_cases=val_cases, seed=seed))
        empty = float(np.mean([area[c] == 0 for c in val]))
        per_fold.append({"dice": empty, "iou": empty, "precision": empty, "recall": empty, "specificity": 1.0})
    s = aggregate_cv(per_fold, folds)
    return {k: (s.mean[k], s.std[k]) for k in s.mean}


def main(argv: list[str] | None = None) -> int:
    import torch

    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--busi", type=Path, default=DEFAULT_BUSI)
    p.add_argument("--work", type=Path, default=Path(os.environ.get("M2SNET_CACHE_DIR", Path.home() / ".cache" / "m2snet")) / "bench")
    p.add_argument("--models", default="m2snet,msnet,unet")
    p.add_argument("--full", action="store_true", help="the paper's recipe: 352 px, 50 epochs, batch 16, all cases")
    p.add_argument("--size", type=int, default=352 if cuda else 64)
    p.add_argument("--epochs", type=int, default=50 if cuda else 1)
    p.add_argument("--batch", type=int, default=16 if cuda else 4)
    p.add_argument("--cases-per-fold", type=int, default=None if cuda else 16,
                   help="subsample the training cases of each fold (default: all on CUDA, 16 on CPU)")
    p.add_argument("--val-cases", type=int, default=None, help="subsample validation cases per fold")
    p.add_argument("--folds", default="0,1,2,3")
    p.add_argument("--lossnet-weight", type=float, default=0.1)
    p.add_argument("--pretrained", default="true", help="true (hub), false (random) or a weights file")
    p.add_argument("--workers", type=int, default=4 if cuda else 0)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--tracking-uri", default=None, help="log to MLflow (default: no tracking)")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--no-validate", action="store_true",
                   help="skip great-expectations validation of the import (machines without it)")
    args = p.parse_args(argv)
    if args.full:
        args.size, args.epochs, args.batch, args.cases_per_fold, args.val_cases = 352, 50, 16, None, None
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    for noisy in ("great_expectations", "alembic", "mlflow"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if not (args.busi / "benign").is_dir():
        print(f"error: BUSI not found at {args.busi} (use --busi)", file=sys.stderr)
        return 2

    from m2snet.cv import PAPER_BUSI_M2SNET, run_cv
    from m2snet.evaluation.metrics import BUSI_TABLE
    from m2snet.tracking import TrackingConfig
    from m2snet.training.config import TrainConfig

    pretrained: bool | str = {"true": True, "false": False}.get(args.pretrained.lower(), args.pretrained)
    info, split_path = import_busi(args.busi, args.work, args.seed, validate=not args.no_validate)
    out = args.out or args.work / f"busi-cv-{time.strftime('%Y%m%d-%H%M%S')}"
    folds = [int(f) for f in args.folds.split(",")]
    rows: dict[str, dict[str, tuple[float, float]]] = {}
    timings: dict[str, float] = {}
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        cfg = TrainConfig(
            data=str(info.root), split=str(split_path), model=name, epochs=args.epochs, batch_size=args.batch,
            size=args.size, pretrained=pretrained, lossnet_weight=args.lossnet_weight,
            lossnet_pretrained=pretrained if isinstance(pretrained, bool) else True,
            max_train_cases=args.cases_per_fold, max_val_cases=args.val_cases, num_workers=args.workers,
            seed=args.seed, progress=True, cache_dir=str(args.work / "cache"),
        )
        t0 = time.perf_counter()
        res = run_cv(cfg, out / name, folds,
                     tracking=TrackingConfig(uri=args.tracking_uri, experiment="busi-bench") if args.tracking_uri else None,
                     log_models=False, with_sod=False)
        timings[name] = time.perf_counter() - t0
        rows[name] = {k: (res.summary.mean[k], res.summary.std[k]) for k in res.summary.mean}
        # One line per model as soon as it is done, so a run cut short still reports what it finished.
        print(f"[{name}] {timings[name]:.0f}s " + ", ".join(
            f"{label} {rows[name][k][0]:.2f}±{rows[name][k][1]:.2f}" for label, k in BUSI_TABLE), flush=True)
    rows["paper M2SNet (Tab. 4)"] = PAPER_BUSI_M2SNET
    rows["all-background"] = background_baseline(info, split_path, folds, args.val_cases, args.seed)

    budget = (f"{len(folds)} folds, {args.size} px, {args.epochs} epochs, batch {args.batch}, "
              f"train cases/fold {args.cases_per_fold or 'all'}, val cases/fold {args.val_cases or 'all'}, "
              f"pretrained={args.pretrained}, device={'cuda' if cuda else 'cpu'}")
    lines = [f"BUSI cross-validation ({budget})", "",
             "| model | " + " | ".join(c for c, _ in BUSI_TABLE) + " | time |",
             "|---|" + "---|" * (len(BUSI_TABLE) + 1)]
    for name, vals in rows.items():
        cells = [f"{vals[k][0]:.2f} ± {vals[k][1]:.2f}" for _, k in BUSI_TABLE]
        t = f"{timings[name]:.0f}s" if name in timings else ""
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {t} |")
    table = "\n".join(lines)
    print(table)
    out.mkdir(parents=True, exist_ok=True)
    (out / "busi_cv_table.md").write_text(table + "\n")
    (out / "busi_cv.json").write_text(json.dumps({"budget": budget, "rows": rows, "seconds": timings}, indent=2))
    print(f"\nwritten: {out / 'busi_cv_table.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
