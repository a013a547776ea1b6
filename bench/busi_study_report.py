"""The table of the issue-21 study (bench/busi_study.sh): every finished job's Dice, mean +- std over
seeds x folds, and the paired comparisons that answer the study's questions, each with `m2snet
compare`'s statistics (B - A, bootstrap 95 % CI with cases resampled within folds, Wilcoxon p).

Usage: python bench/busi_study_report.py --study /tmp/study [--out docs/study-busi.md]
A job (or a seed of it) that has not finished is left out and named; a comparison whose side has
not finished is skipped and named.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections import defaultdict
from pathlib import Path

from m2snet.errors import M2SNetError
from m2snet.files import write_text
from m2snet.mlops.cv_results import JOIN, load_cv_cases
from m2snet.workflows.comparison import compare_cv

# label -> job name in bench/busi_study.sh (runs/<name>/seed<k>)
JOBS = {
    "M2SNet, backbone LR 0.05 (= head)": "m2snet-bb05",
    "MSNet, backbone LR 0.05 (= head)": "msnet-bb05",
    "M2SNet, backbone LR 0.005 (head / 10, the paper's)": "m2snet-bb005",
    "MSNet, backbone LR 0.005 (head / 10, the paper's)": "msnet-bb005",
    "M2SNet bb 0.05, warm-up 0.2 (triangle peak at 20 %)": "m2snet-bb05-warmup02",
    "M2SNet bb 0.05, filter BN momentum 0.01": "m2snet-bb05-bnmom001",
    "M2SNet bb 0.05, filter BN gamma initialised to 0.1": "m2snet-bb05-gamma01",
    "U-Net (smp, same Res2Net-50 encoder), backbone LR 0.05": "unet-bb05",
}
# (question, A, B): the report is B - A.
COMPARISONS = [
    ("M2SNet vs MSNet, recipe bb 0.05", "msnet-bb05", "m2snet-bb05"),
    ("M2SNet vs MSNet, the paper's recipe (bb 0.005)", "msnet-bb005", "m2snet-bb005"),
    ("backbone LR 0.05 vs 0.005, M2SNet", "m2snet-bb005", "m2snet-bb05"),
    ("backbone LR 0.05 vs 0.005, MSNet", "msnet-bb005", "msnet-bb05"),
    ("U-Net vs MSNet (bb 0.05)", "msnet-bb05", "unet-bb05"),
    ("M2SNet vs U-Net (bb 0.05)", "unet-bb05", "m2snet-bb05"),
    ("warm-up 0.2 vs 0.5, M2SNet bb 0.05", "m2snet-bb05", "m2snet-bb05-warmup02"),
    ("filter BN momentum 0.01 vs 0.1, M2SNet bb 0.05", "m2snet-bb05", "m2snet-bb05-bnmom001"),
    ("filter BN gamma init 0.1 vs 1.0, M2SNet bb 0.05", "m2snet-bb05", "m2snet-bb05-gamma01"),
    ("M2SNet gamma 0.1 vs MSNet (bb 0.05)", "msnet-bb05", "m2snet-bb05-gamma01"),
]


def finished_seeds(study: Path, job: str) -> list[Path]:
    return sorted(d for d in (study / "runs" / job).glob("seed*") if (d / "cv_per_case.csv").is_file())


def source(study: Path, job: str) -> str | None:
    parts = finished_seeds(study, job)
    return JOIN.join(str(p) for p in parts) if parts else None


def _seeds(seeds: list[str]) -> str:
    return f"seed {seeds[0]}" if len(seeds) == 1 else f"seeds {', '.join(seeds)}"


def fold_means(src: str, metric: str) -> list[float]:
    """One mean per (seed, fold): the CV table's unit, whose spread is the table's +- std."""
    per: dict[tuple[str, str], list[float]] = defaultdict(list)
    for row in load_cv_cases(src).rows:
        per[(row.get("seed", ""), row["fold"])].append(float(row[metric]))
    return [100 * statistics.fmean(v) for v in per.values()]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--study", type=Path, required=True)
    ap.add_argument("--out", type=Path, help="write the markdown report here too")
    ap.add_argument("--resamples", type=int, default=10_000)
    args = ap.parse_args(argv)
    study = args.study.resolve()
    lines = ["| model, recipe | seeds | folds | Dice (%) | IoU (%) |", "|---|---|---|---|---|"]
    missing = []
    for label, job in JOBS.items():
        src = source(study, job)
        if src is None:
            missing.append(job)
            continue
        cases = load_cv_cases(src)
        dice, iou = fold_means(src, "dice"), fold_means(src, "iou")
        folds = sorted({r["fold"] for r in cases.rows})
        lines.append(f"| {label} | {', '.join(cases.seeds)} | {','.join(folds)} | "
                     f"{statistics.fmean(dice):.2f} +- {statistics.stdev(dice) if len(dice) > 1 else 0:.2f} | "
                     f"{statistics.fmean(iou):.2f} +- {statistics.stdev(iou) if len(iou) > 1 else 0:.2f} |")
    lines += ["", "Paired comparisons (`m2snet compare A B`; B - A in Dice points on the cases both scored, "
              "each case averaged over its side's seeds):", "",
              "| question | A | B | cases | B - A | 95 % CI | Wilcoxon p | per fold | cases B wins / A wins |",
              "|---|---|---|---|---|---|---|---|---|"]
    for question, job_a, job_b in COMPARISONS:
        src_a, src_b = source(study, job_a), source(study, job_b)
        if src_a is None or src_b is None:
            missing.append(f"comparison '{question}'")
            continue
        res = compare_cv(src_a, src_b, study / "compare" / f"{job_b}-vs-{job_a}", metrics=["dice", "iou"],
                         log_run=False, n_resamples=args.resamples)
        d = res.comparison.metrics["dice"]
        folds = ", ".join(f"{k}: {100 * v:+.1f}" for k, v in sorted(d.per_fold.items()))
        lines.append(f"| {question} | {job_a} ({_seeds(res.a.seeds)}) | {job_b} ({_seeds(res.b.seeds)}) | "
                     f"{res.comparison.n_cases} | {100 * d.diff:+.2f} | "
                     f"[{100 * d.ci_low:+.2f}, {100 * d.ci_high:+.2f}] | "
                     f"{d.p_wilcoxon:.3g} | {folds} | {d.wins_b} / {d.wins_a} |")
    if missing:
        lines += ["", "Not finished (left out): " + "; ".join(missing)]
    text = "\n".join(lines)
    print(text)
    if args.out:
        write_text(args.out, text + "\n")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except M2SNetError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
