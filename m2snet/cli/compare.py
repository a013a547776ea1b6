"""`m2snet compare A B`: is CV B better than CV A, paired on the same cases, with a confidence interval."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer

from m2snet.cli.options import TRACKING_URI

app = typer.Typer()


@app.command("compare")
def compare_cmd(
    a: str = typer.Argument(..., help="CV A: its output directory, MLflow parent run id, or models:/NAME/VERSION "
                                      "(or models:/NAME@alias); DIR1+DIR2 joins the seeds or folds of one CV run "
                                      "as separate jobs."),
    b: str = typer.Argument(..., help="CV B, the same ways; the report is B - A."),
    metric: List[str] = typer.Option(["dice", "iou"], "--metric", help="Metric(s) to compare (repeatable)."),
    out: Path = typer.Option(Path("runs/compare"), "--out", help="Where compare.txt/.json and the figure go."),
    resamples: int = typer.Option(10_000, "--resamples", help="Bootstrap resamples (cases within folds)."),
    seed: int = typer.Option(0, "--seed", help="Bootstrap seed."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON (for scripts)."),
    tracking_uri: Optional[str] = TRACKING_URI,
    experiment: str = typer.Option("", "--experiment", help="MLflow experiment of the compare run "
                                   "(default: A's run's experiment, else 'm2snet')."),
    no_track: bool = typer.Option(False, "--no-track", help="Do not log a compare run to MLflow."),
) -> None:
    """Paired comparison of two cross-validations on their common cases: mean difference B - A with a
    bootstrap 95 % CI (cases resampled within folds), Wilcoxon p, per-fold differences, cases won.
    Refuses (exit 2) when A and B used another data version or split."""
    from m2snet.mlops.mlflow_store import TrackingConfig
    from m2snet.workflows.comparison import compare_cv

    res = compare_cv(a, b, out, metrics=metric, tracking=TrackingConfig(uri=tracking_uri, experiment=experiment),
                     log_run=not no_track, n_resamples=resamples, seed=seed)
    if as_json:
        typer.echo(json.dumps(res.to_dict(), indent=2))
        return
    typer.echo(res.report)
    typer.echo(f"\nfigure: {res.figure}" + (f"\nmlflow run: {res.run_id}" if res.run_id else ""))
