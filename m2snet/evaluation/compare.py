"""Paired comparison of two cross-validations scored on the same cases: pure functions over arrays.

Two models evaluated on the same validation cases give paired scores, and the question "is B
better than A" is about the per-case differences ``d = B - A``:

- the mean difference with a paired bootstrap 95 % confidence interval, resampling cases WITHIN
  each fold (stratified by fold: every resample keeps each fold's size, as the CV did);
- the Wilcoxon signed-rank test of the differences (two-sided; exact zeros dropped, scipy's default);
- the mean difference in each fold, and how many cases each side wins (and how many tie).

Per-case rows come from a CV's ``cv_per_case.csv`` (``seed, fold, case_id, label, <metrics>``);
:func:`average_seeds` turns several seeds into one score per case before pairing. Nothing here
knows about MLflow or files: the loading and logging live in :mod:`m2snet.mlops.cv_results` and
:mod:`m2snet.workflows.comparison`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np

from m2snet.errors import M2SNetError

N_RESAMPLES = 10_000
CONFIDENCE = 0.95
BOOTSTRAP_SEED = 0
TIE_TOLERANCE = 1e-9  # |B - A| at most this counts as a tie (scores are float32-rounded fractions)
METRICS = ("dice", "iou")  # compared by default (fractions 0..1)


LINEAGE = (("data_version", "data version"), ("split_sha256", "split sha256"))


def lineage_difference(a: Mapping[str, Any], b: Mapping[str, Any], name_a: str = "A",
                       name_b: str = "B") -> str | None:
    """Why two CVs cannot be paired (another data version or split), or None when they can."""
    for key, what in LINEAGE:
        va, vb = a.get(key), b.get(key)
        if not va or not vb:
            return f"the {what} of {name_a if not va else name_b} is unknown"
        if va != vb:
            return f"{what} differs: {name_a} {va} vs {name_b} {vb}"
    return None


@dataclass(frozen=True)
class CaseScores:
    """One score per case of one side, aligned arrays (a case id may appear in several folds only
    in a repeated CV; here it is unique per (fold, case))."""

    fold: np.ndarray  # int, [n]
    case_id: np.ndarray  # str, [n]
    values: dict[str, np.ndarray]  # metric -> float [n]
    n_seeds: int = 1


def _cell(row: Mapping[str, Any], column: str, where: str, parse: type) -> Any:
    """``row[column]`` parsed by ``parse`` (int or float); a cell that is empty, text or not finite raises
    one line naming ``where`` (the file and line), the case and the column. A NaN score would make every
    bootstrap mean NaN, an interval people would read as a result."""
    raw = row.get(column)
    where = f"{where} (case {row.get('case_id')}), column {column!r}"
    if raw is None or str(raw).strip() == "":
        raise M2SNetError(f"{where}: is empty")
    try:
        value = parse(raw)
    except (TypeError, ValueError):
        raise M2SNetError(f"{where}: {raw!r} is not {'an integer' if parse is int else 'a number'}") from None
    if parse is float and not math.isfinite(value):
        raise M2SNetError(f"{where}: {raw!r} is not a finite number (every paired case needs a score: "
                          "re-evaluate the case or remove its row)")
    return value


def average_seeds(rows: Sequence[Mapping[str, Any]], metrics: Sequence[str] = METRICS,
                  origins: Sequence[str] | None = None) -> CaseScores:
    """Per-case rows (each with ``fold``, ``case_id``, optional ``seed`` and the metrics) -> one score
    per (fold, case): the mean over the seeds that scored it.

    ``origins``: where each row comes from (``FILE line N``), named when a fold or score does not parse
    or a score is not finite."""
    if not rows:
        raise M2SNetError("no per-case rows")
    missing = [m for m in metrics if m not in rows[0]]
    if missing:
        raise M2SNetError(f"per-case rows have no {missing} column(s)")
    sums: dict[tuple[int, str], np.ndarray] = {}
    counts: dict[tuple[int, str], int] = {}
    seeds = set()
    for i, r in enumerate(rows):
        where = origins[i] if origins else f"per-case row {i + 1}"
        key = (_cell(r, "fold", where, int), str(r["case_id"]))
        vals = np.array([_cell(r, m, where, float) for m in metrics], dtype=np.float64)
        sums[key] = sums.get(key, 0.0) + vals
        counts[key] = counts.get(key, 0) + 1
        seeds.add(str(r.get("seed", "")))
    keys = sorted(sums)
    table = np.stack([sums[k] / counts[k] for k in keys])
    return CaseScores(fold=np.array([k[0] for k in keys], dtype=np.int64),
                      case_id=np.array([k[1] for k in keys], dtype=object),
                      values={m: table[:, i] for i, m in enumerate(metrics)}, n_seeds=len(seeds))


@dataclass(frozen=True)
class Paired:
    """The cases both sides scored, in one order; ``only_a`` / ``only_b``: how many were left out."""

    fold: np.ndarray
    case_id: np.ndarray
    a: dict[str, np.ndarray]
    b: dict[str, np.ndarray]
    only_a: int
    only_b: int


def pair(a: CaseScores, b: CaseScores) -> Paired:
    """Match the two sides on (fold, case id); raise when they share no case."""
    index_b = {(int(f), c): i for i, (f, c) in enumerate(zip(b.fold, b.case_id))}
    ia, ib = [], []
    for i, (f, c) in enumerate(zip(a.fold, a.case_id)):
        j = index_b.get((int(f), c))
        if j is not None:
            ia.append(i)
            ib.append(j)
    if not ia:
        raise M2SNetError("the two results share no (fold, case): they were not scored on the same cases")
    ia_, ib_ = np.array(ia), np.array(ib)
    metrics = [m for m in a.values if m in b.values]
    return Paired(fold=a.fold[ia_], case_id=a.case_id[ia_], a={m: a.values[m][ia_] for m in metrics},
                  b={m: b.values[m][ib_] for m in metrics}, only_a=len(a.fold) - len(ia), only_b=len(b.fold) - len(ib))


def stratified_bootstrap_means(diff: np.ndarray, strata: np.ndarray, n_resamples: int = N_RESAMPLES,
                               seed: int = BOOTSTRAP_SEED) -> np.ndarray:
    """``n_resamples`` bootstrap replicates of the mean of ``diff``, resampling within each stratum.

    Each replicate draws, in every stratum (fold), as many cases as it has, with replacement; the
    replicate is the mean over all drawn cases (so folds weigh by their size, as in the plain mean).
    """
    diff = np.asarray(diff, dtype=np.float64)
    rng = np.random.default_rng(seed)
    total = np.zeros(n_resamples)
    for s in np.unique(strata):
        d = diff[strata == s]
        idx = rng.integers(0, len(d), size=(n_resamples, len(d)))
        total += d[idx].sum(axis=1)
    return total / len(diff)


def wilcoxon_p(diff: np.ndarray) -> float:
    """Two-sided Wilcoxon signed-rank p-value of the paired differences (1.0 when all are zero)."""
    from scipy.stats import wilcoxon

    d = np.asarray(diff, dtype=np.float64)
    if not np.any(np.abs(d) > TIE_TOLERANCE):
        return 1.0
    return float(wilcoxon(d).pvalue)


@dataclass
class MetricComparison:
    metric: str
    mean_a: float
    mean_b: float
    diff: float  # mean of B - A over the paired cases
    ci_low: float
    ci_high: float
    p_wilcoxon: float
    per_fold: dict[int, float]  # fold -> mean of B - A on its cases
    wins_a: int
    wins_b: int
    ties: int


@dataclass
class Comparison:
    """B - A on the paired cases, for every compared metric."""

    n_cases: int
    n_folds: int
    only_a: int
    only_b: int
    n_resamples: int
    confidence: float
    seed: int
    metrics: dict[str, MetricComparison]
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        for m in out["metrics"].values():
            m["per_fold"] = {str(k): v for k, v in m["per_fold"].items()}
        return out


def compare_metric(metric: str, a: np.ndarray, b: np.ndarray, fold: np.ndarray, *,
                   n_resamples: int = N_RESAMPLES, confidence: float = CONFIDENCE,
                   seed: int = BOOTSTRAP_SEED) -> MetricComparison:
    """Mean difference B - A, its fold-stratified bootstrap CI, Wilcoxon p, per-fold means, wins."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    diff = b - a
    reps = stratified_bootstrap_means(diff, fold, n_resamples, seed)
    tail = (1.0 - confidence) / 2.0 * 100.0
    low, high = np.percentile(reps, [tail, 100.0 - tail])
    return MetricComparison(
        metric=metric, mean_a=float(a.mean()), mean_b=float(b.mean()), diff=float(diff.mean()),
        ci_low=float(low), ci_high=float(high), p_wilcoxon=wilcoxon_p(diff),
        per_fold={int(f): float(diff[fold == f].mean()) for f in np.unique(fold)},
        wins_a=int((diff < -TIE_TOLERANCE).sum()), wins_b=int((diff > TIE_TOLERANCE).sum()),
        ties=int((np.abs(diff) <= TIE_TOLERANCE).sum()))


def compare_paired(p: Paired, metrics: Sequence[str] = METRICS, *, n_resamples: int = N_RESAMPLES,
                   confidence: float = CONFIDENCE, seed: int = BOOTSTRAP_SEED) -> Comparison:
    """:func:`compare_metric` for each metric both sides have."""
    if not 0.0 < confidence < 1.0:
        raise M2SNetError(f"confidence={confidence} must be within (0, 1)")
    if n_resamples < 100:
        raise M2SNetError(f"n_resamples={n_resamples}: use at least 100 bootstrap resamples")
    names = [m for m in metrics if m in p.a]
    if not names:
        raise M2SNetError(f"neither side has the metric(s) {list(metrics)}")
    return Comparison(
        n_cases=len(p.fold), n_folds=len(np.unique(p.fold)), only_a=p.only_a, only_b=p.only_b,
        n_resamples=n_resamples, confidence=confidence, seed=seed,
        metrics={m: compare_metric(m, p.a[m], p.b[m], p.fold, n_resamples=n_resamples, confidence=confidence,
                                   seed=seed) for m in names})


def format_comparison(c: Comparison, name_a: str = "A", name_b: str = "B") -> str:
    """The report ``m2snet compare`` prints (differences in percentage points)."""
    pct = int(round(c.confidence * 100))
    lines = [f"A = {name_a}", f"B = {name_b}",
             f"paired on {c.n_cases} cases in {c.n_folds} folds"
             + (f" ({c.only_a} cases only in A, {c.only_b} only in B: left out)" if c.only_a or c.only_b else ""),
             *c.notes, ""]
    for m in c.metrics.values():
        lines.append(f"{m.metric}: A {100 * m.mean_a:.2f}  B {100 * m.mean_b:.2f}  "
                     f"B - A {100 * m.diff:+.2f} points, {pct} % CI [{100 * m.ci_low:+.2f}, {100 * m.ci_high:+.2f}] "
                     f"(bootstrap within folds, {c.n_resamples} resamples); Wilcoxon p = {m.p_wilcoxon:.3g}")
        lines.append("  per fold B - A: " + ", ".join(f"fold {k} {100 * v:+.2f}" for k, v in m.per_fold.items()))
        lines.append(f"  cases won: A {m.wins_a}, B {m.wins_b}, ties {m.ties}")
    return "\n".join(lines)
