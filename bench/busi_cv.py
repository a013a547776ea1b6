"""Four-fold cross-validation on the real BUSI set for several models under one shared budget.

    python bench/busi_cv.py                       # CPU: a tiny budget (64 px, 1 epoch, 16 cases/fold)
    python bench/busi_cv.py --size 352 --epochs 6 --batch 16   # a short GPU run (< 8 min on one H100)
    python bench/busi_cv.py --full                # the paper's recipe (352 px, 50 epochs, all cases)
    python bench/busi_cv.py --protocol old        # the first version's protocol, to measure its optimism

Models are ``[LABEL=]NAME[:KEY=VALUE...]`` (create_model kwargs), e.g.
``--models m2snet-shared=m2snet:msu_norm=shared,m2snet,msnet,unet``.

Protocols (every model runs through the same fold engine as ``m2snet cv`` and the pipeline):
``new`` -- duplicate clusters (exact + near) kept in one fold, checkpoint = final epoch;
``old`` -- byte-identical duplicates only, checkpoint = best epoch on the reported fold
(test-set selection); each fold's final epoch is scored too (row "... final epoch").
``--extra-evals batch-stats,recalibrated`` adds rows for models with an MSU: the same checkpoints
scored with the filter BatchNorms normalising by batch statistics, and after re-estimating the
running statistics on the fold's training cases.

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
    """The BUSI dataset dir + both 4-fold splits under ``work`` (re-used when already there).

    Returns (info, {"new": cluster-grouped split, "old": sha256-grouped split}) and prints how many
    duplicate clusters each split puts across folds.
    """
    from m2snet.data.format import load_dataset
    from m2snet.data.grouping import groups_across
    from m2snet.data.importers import import_dataset
    from m2snet.data.split import load_split, make_split

    dest = work / "busi"
    if not (dest / "manifest.csv").is_file():
        import_dataset("busi", src, dest, progress=True, validate=validate)
    info = load_dataset(dest)
    splits = {}
    for protocol, group_by in (("new", "cluster"), ("old", "sha256")):
        path = work / f"busi.split-4fold-seed{seed}-{group_by}.json"
        split = load_split(path) if path.is_file() else make_split(info, n_folds=4, seed=seed, out=path,
                                                                   duplicates=group_by)
        fold_of = {cid: k for k, f in enumerate(split.folds) for cid in f.val}
        across = groups_across(info.cases, fold_of)
        print(f"split {protocol} (group by {group_by}): {len(across)} duplicate groups across folds"
              + (f", e.g. {across[:3]}" if across else ""), flush=True)
        splits[protocol] = path
    return info, splits


def parse_models(text: str) -> list[tuple[str, str, dict]]:
    """``[LABEL=]NAME[:KEY=VALUE...]`` comma-separated -> (label, model name, create_model kwargs)."""
    import json

    out = []
    for item in (t.strip() for t in text.split(",") if t.strip()):
        label, _, spec = item.partition("=") if "=" in item.split(":")[0] else ("", "", item)
        name, *pairs = spec.split(":")
        kwargs = {}
        for pair in pairs:
            key, _, raw = pair.partition("=")
            try:
                kwargs[key] = json.loads(raw)
            except json.JSONDecodeError:
                kwargs[key] = raw
        out.append((label or spec, name, kwargs))
    return out


def background_baseline(info, split_path: Path, folds: list[int], val_cases: int | None,
                        seed: int) -> dict[str, tuple[float, float]]:
    """Metrics of predicting an empty mask everywhere on the same validation cases the models see.

    By the empty-mask convention a normal (empty) case scores 1 on every ratio and a lesion case 0;
    specificity is 1 everywhere (no false positives).
    """
    import numpy as np

    from m2snet.training.cases import resolve_cases
    from m2snet.training.config import TrainConfig
    from m2snet.workflows.cv_summary import summarize_cv

    area = {c.case_id: c.lesion_area for c in info.cases}
    per_fold = []
    for k in folds:
        val = resolve_cases(TrainConfig(data=str(info.root), split=str(split_path), fold=k, leak_check=False,
                                        max_val_cases=val_cases, seed=seed)).reported
        empty = float(np.mean([area[c] == 0 for c in val]))
        per_fold.append({"dice": empty, "iou": empty, "precision": empty, "recall": empty, "specificity": 1.0})
    s = summarize_cv(per_fold, folds)
    return {k: (s.mean[k], s.std[k]) for k in s.mean}


def extra_rows(label: str, cfg, res, extras: list[str], protocol: str) -> dict[str, list[dict]]:
    """Per-fold metrics of the same runs under other readings (final epoch, batch stats, recalibrated)."""
    from m2snet.evaluation.evaluate import evaluate_predictor
    from m2snet.evaluation.predict import Predictor
    from m2snet.runtime import resolve_device
    from m2snet.training.cases import resolve_cases
    from m2snet.workflows.folds import ScoreOptions, score_fold

    rows: dict[str, list[dict]] = {}
    device = resolve_device(cfg.device)  # where the runs trained
    for fr in res.folds:
        cases = resolve_cases(cfg.override(fold=fr.fold))
        if protocol == "old":
            ev = score_fold(fr.out_dir / "last.pt", cfg.data, cases.reported, fr.out_dir / "eval-final",
                            options=ScoreOptions(device=device, batch_size=cfg.batch_size, with_sod=False))
            rows.setdefault(f"{label} (old split, final epoch)", []).append(ev.metrics)
        if "batch-stats" in extras:
            from m2snet.training.bn_recalibration import filter_batch_statistics

            predictor = Predictor.from_checkpoints([fr.checkpoint], device=device, batch_size=cfg.batch_size)
            with filter_batch_statistics(predictor.models[0]):  # the MSU filters normalise by batch statistics
                ev = evaluate_predictor(predictor, cfg.data, cases.reported, with_sod=False)
            rows.setdefault(f"{label} (filter BN on batch statistics)", []).append(ev.metrics)
        if "recalibrated" in extras:
            from m2snet.training.bn_recalibration import RecalibrationOptions, recalibrate_checkpoint

            out, _ = recalibrate_checkpoint(fr.checkpoint, fr.out_dir / "model-recalibrated.pt", data=cfg.data,
                                            options=RecalibrationOptions(
                                                split=cfg.split, fold=fr.fold, msu_norm=None,
                                                max_cases=cfg.max_train_cases, device=device, seed=cfg.seed))
            ev = score_fold(out, cfg.data, cases.reported, fr.out_dir / "eval-recalibrated",
                            options=ScoreOptions(device=device, batch_size=cfg.batch_size, with_sod=False))
            rows.setdefault(f"{label} + BN recalibration", []).append(ev.metrics)
    return rows


def main(argv: list[str] | None = None) -> int:
    import torch

    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--busi", type=Path, default=DEFAULT_BUSI)
    cache_root = Path(os.environ.get("M2SNET_CACHE_DIR", Path.home() / ".cache" / "m2snet"))
    p.add_argument("--work", type=Path, default=cache_root / "bench")
    p.add_argument("--models", default="m2snet,msnet,unet", help="[LABEL=]NAME[:KEY=VALUE...], comma-separated")
    p.add_argument("--protocol", choices=("new", "old"), default="new")
    p.add_argument("--extra-evals", default="", help="batch-stats,recalibrated (models with an MSU)")
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

    from m2snet.evaluation.metrics import BUSI_TABLE
    from m2snet.training.config import TrainConfig
    from m2snet.workflows.context import RunContext
    from m2snet.workflows.cv import run_cv
    from m2snet.workflows.cv_summary import summarize_cv
    from m2snet.workflows.folds import FoldOptions, ScoreOptions
    from m2snet.workflows.paper import PAPER_BUSI_M2SNET

    pretrained: bool | str = {"true": True, "false": False}.get(args.pretrained.lower(), args.pretrained)
    info, splits = import_busi(args.busi, args.work, args.seed, validate=not args.no_validate)
    split_path = splits[args.protocol]
    # old: test-set selection on a sha256-grouped split (kept only to measure it); new: honest.
    protocol = ({"selection": "fold_best", "leak_check": False} if args.protocol == "old" else {"selection": "final"})
    extras = [e for e in args.extra_evals.split(",") if e]
    out = args.out or args.work / f"busi-cv-{args.protocol}-{time.strftime('%Y%m%d-%H%M%S')}"
    folds = [int(f) for f in args.folds.split(",")]
    rows: dict[str, dict[str, tuple[float, float]]] = {}
    timings: dict[str, float] = {}
    histories: dict[str, list[list[dict]]] = {}

    def add_row(label: str, summary) -> None:
        rows[label] = {k: (summary.mean[k], summary.std[k]) for k in summary.mean}
        # One line per row as soon as it is done, so a run cut short still reports what it finished.
        print(f"[{label}] {timings.get(label, 0):.0f}s " + ", ".join(
            f"{name} {rows[label][k][0]:.2f}±{rows[label][k][1]:.2f}" for name, k in BUSI_TABLE if k in rows[label]),
            flush=True)

    tracking = None
    if args.tracking_uri:
        from m2snet.mlops.mlflow_store import TrackingConfig

        tracking = TrackingConfig(uri=args.tracking_uri, experiment="busi-bench")
    for label, name, model_config in parse_models(args.models):
        cfg = TrainConfig(
            data=str(info.root), split=str(split_path), model=name, model_config=model_config, epochs=args.epochs,
            batch_size=args.batch, size=args.size, pretrained=pretrained, lossnet_weight=args.lossnet_weight,
            lossnet_pretrained=pretrained if isinstance(pretrained, bool) else True,
            max_train_cases=args.cases_per_fold, max_val_cases=args.val_cases, num_workers=args.workers,
            seed=args.seed, progress=False, cache_dir=str(args.work / "cache"), **protocol,
            # Recalibration is measured as its own row (--extra-evals recalibrated), not folded in.
            recalibrate_bn=False,
        )
        t0 = time.perf_counter()
        res = run_cv(cfg, out / label, folds, ctx=RunContext(tracking),
                     options=FoldOptions(log_model=False, score=ScoreOptions(with_sod=False)))
        timings[label] = time.perf_counter() - t0
        histories[label] = [fr.history for fr in res.folds]
        add_row(label + (" (old protocol: best epoch on the fold)" if args.protocol == "old" else ""), res.summary)
        for extra_label, per_fold in extra_rows(label, cfg, res, extras, args.protocol).items():
            add_row(extra_label, summarize_cv(per_fold, folds))
    rows["paper M2SNet (Tab. 4)"] = PAPER_BUSI_M2SNET
    rows["all-background"] = background_baseline(info, split_path, folds, args.val_cases, args.seed)

    budget = (f"protocol {args.protocol}, {len(folds)} folds, {args.size} px, {args.epochs} epochs, "
              f"batch {args.batch}, train cases/fold {args.cases_per_fold or 'all'}, "
              f"val cases/fold {args.val_cases or 'all'}, pretrained={args.pretrained}, "
              f"device={'cuda' if cuda else 'cpu'}")
    lines = [f"BUSI cross-validation ({budget})", "",
             "| model | " + " | ".join(c for c, _ in BUSI_TABLE) + " | time |",
             "|---|" + "---|" * (len(BUSI_TABLE) + 1)]
    for name, vals in rows.items():
        cells = [f"{vals[k][0]:.2f} ± {vals[k][1]:.2f}" if k in vals else "n/a" for _, k in BUSI_TABLE]
        t = f"{timings[name]:.0f}s" if name in timings else ""
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {t} |")
    table = "\n".join(lines)
    print(table)
    out.mkdir(parents=True, exist_ok=True)
    (out / "busi_cv_table.md").write_text(table + "\n")
    (out / "busi_cv.json").write_text(json.dumps({"budget": budget, "rows": rows, "seconds": timings,
                                                  "histories": histories}, indent=2))
    from m2snet.evaluation.plots import compare_val_dice

    curves = compare_val_dice(histories, out / "val_dice_curves.png", title=f"BUSI CV, {budget}")
    print(f"\nwritten: {out / 'busi_cv_table.md'}, {curves}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
