"""``m2snet compare A B``: which of two cross-validations is better, with a confidence interval.

Loads both sides' per-case results (:func:`m2snet.mlops.cv_results.load_cv_cases`), refuses when
they were computed on another data version or split, averages each case over seeds, pairs the
cases and computes the statistics of :mod:`m2snet.evaluation.compare`; writes the report, its JSON
and the figure to ``out_dir``, and logs them as a ``compare`` run of the experiment (tag
``m2snet.kind=compare``; params: both sides, the data version and split; metrics ``<metric>_diff``,
``<metric>_ci_low``/``_ci_high``, ``<metric>_p_wilcoxon``).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

from m2snet.errors import M2SNetError
from m2snet.evaluation.compare import (
    BOOTSTRAP_SEED,
    METRICS,
    N_RESAMPLES,
    Comparison,
    average_seeds,
    compare_paired,
    format_comparison,
    lineage_difference,
    pair,
)
from m2snet.evaluation.plots import paired_scores
from m2snet.files import write_json, write_text
from m2snet.mlops.cv_results import CVCases, load_cv_cases
from m2snet.mlops.mlflow_store import TrackingConfig
from m2snet.mlops.tracking import Tracker

log = logging.getLogger("m2snet.workflows.comparison")


@dataclass
class CompareResult:
    comparison: Comparison
    a: CVCases
    b: CVCases
    report: str
    out_dir: Path
    figure: Path
    run_id: str | None = None

    def to_dict(self) -> dict:
        return {"a": self.a.source, "b": self.b.source, "a_run_id": self.a.run_id, "b_run_id": self.b.run_id,
                **self.a.lineage(), **self.comparison.to_dict(), "figure": str(self.figure),
                "run_id": self.run_id}


def _seed_note(side: str, cases: CVCases) -> str | None:
    seeds = [s for s in cases.seeds if s]
    return f"{side}: each case averaged over {len(seeds)} seeds ({', '.join(seeds)})" if len(seeds) > 1 else None


def compare_cv(source_a: str, source_b: str, out_dir: str | os.PathLike, *, metrics: Sequence[str] = METRICS,
               tracking: TrackingConfig | None = None, log_run: bool = True, n_resamples: int = N_RESAMPLES,
               seed: int = BOOTSTRAP_SEED) -> CompareResult:
    """Compare CV ``source_b`` against CV ``source_a`` (B - A) on their common cases.

    ``tracking``: where run ids and ``models:/`` URIs are looked up and, with ``log_run``, where the
    compare run is logged (default: :class:`TrackingConfig`'s); its experiment, when empty, is A's
    run's (else B's, else the default one).
    """
    tracking = tracking or TrackingConfig(experiment="")
    uri = tracking.resolved_uri()
    a, b = load_cv_cases(source_a, uri), load_cv_cases(source_b, uri)
    problem = lineage_difference(a.lineage(), b.lineage())
    if problem:
        raise M2SNetError(f"cannot pair {source_a} and {source_b}: {problem}")
    scores_a, scores_b = average_seeds(a.rows, metrics, a.origins), average_seeds(b.rows, metrics, b.origins)
    paired = pair(scores_a, scores_b)
    comparison = compare_paired(paired, metrics, n_resamples=n_resamples, seed=seed)
    comparison.notes += [n for n in (_seed_note("A", a), _seed_note("B", b)) if n]
    report = format_comparison(comparison, source_a, source_b)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    first = next(iter(comparison.metrics))
    best = comparison.metrics[first]
    level = int(round(100 * comparison.confidence))
    figure = paired_scores(paired.a[first], paired.b[first], paired.fold, out / f"compare_{first}.png",
                           metric=first, label_a=source_a, label_b=source_b,
                           title=f"{first}: B - A = {100 * best.diff:+.2f} points, {level} % CI "
                                 f"[{100 * best.ci_low:+.2f}, {100 * best.ci_high:+.2f}] "
                                 f"({comparison.n_cases} paired cases)")
    result = CompareResult(comparison=comparison, a=a, b=b, report=report, out_dir=out, figure=figure)
    write_text(out / "compare.txt", report + "\n")
    if log_run:
        experiment = tracking.experiment or a.experiment or b.experiment or TrackingConfig().experiment
        result.run_id = _log_compare_run(result, replace(tracking, experiment=experiment))
    write_json(out / "compare.json", result.to_dict())
    return result


def _log_compare_run(result: CompareResult, tracking: TrackingConfig) -> str:
    with Tracker.start(tracking, run_name="compare", tags={"m2snet.kind": "compare"}) as run:
        run.log_params({"a": result.a.source, "b": result.b.source, "a_run_id": result.a.run_id or "none",
                        "b_run_id": result.b.run_id or "none", **result.a.lineage(),
                        "n_cases": result.comparison.n_cases, "n_resamples": result.comparison.n_resamples,
                        "bootstrap_seed": result.comparison.seed})
        flat = {}
        for m in result.comparison.metrics.values():
            flat.update({f"{m.metric}_diff": m.diff, f"{m.metric}_ci_low": m.ci_low, f"{m.metric}_ci_high": m.ci_high,
                         f"{m.metric}_p_wilcoxon": m.p_wilcoxon, f"{m.metric}_wins_a": m.wins_a,
                         f"{m.metric}_wins_b": m.wins_b, f"{m.metric}_ties": m.ties})
        run.log_metrics(flat, flush=True)
        run.set_description(f"```\n{result.report}\n```")
        for path in (result.figure, result.out_dir / "compare.txt"):
            run.log_artifact(path, "compare")
        return run.run_id
