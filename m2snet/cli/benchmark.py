"""CLI: ``m2snet benchmark --protocol NAME DATA``: one of the paper's experiments end to end."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from m2snet.cli.options import NO_TRACK, SETS, TRACKING_URI
from m2snet.errors import M2SNetError

app = typer.Typer()


@app.command("benchmark")
def benchmark_cmd(
    data: Path = typer.Argument(..., help="An m2snet dataset, or a source layout to import (with --format)."),
    protocol: str = typer.Option(..., "--protocol", help="busi, polyp, polyp-video, covid or oct."),
    fmt: Optional[str] = typer.Option(None, "--format", "-f", help="Importer of DATA when it is a source layout."),
    out: Path = typer.Option(Path("runs/benchmark"), "--out", help="Imported data, split, run, tables, report."),
    epochs: Optional[int] = typer.Option(None, "--epochs"),
    size: Optional[int] = typer.Option(None, "--size"),
    batch_size: Optional[int] = typer.Option(None, "--batch-size"),
    model: Optional[str] = typer.Option(None, "--model"),
    seed: int = typer.Option(42, "--seed", help="Seed of the split and of training."),
    sets: List[str] = SETS,
    train: Optional[str] = typer.Option(None, "--train", metavar="SELECTOR", help="Replace the protocol's split: "
                                        "the training set (subset:A,B | ids:FILE | rest; default rest)."),
    test: List[str] = typer.Option([], "--test", metavar="NAME=SELECTOR", help="Replace the protocol's split: a "
                                   "named test set (repeatable), e.g. COVID=ids:infnet-test.txt (Inf-Net's list)."),
    no_log_model: bool = typer.Option(False, "--no-log-model", help="Do not log a pyfunc model."),
    tracking_uri: Optional[str] = TRACKING_URI,
    experiment: str = typer.Option("m2snet-benchmark", "--experiment", help="MLflow experiment name."),
    no_track: bool = NO_TRACK,
) -> None:
    """Import (if needed), split by the protocol's recipe, train, evaluate every test set and print the
    table and the paper's figures beside ours (OUT/paper_comparison.md)."""
    from m2snet.data.fixed_split import parse_test_sets
    from m2snet.training.config import TrainConfig
    from m2snet.workflows.benchmark import benchmark

    overrides = TrainConfig().override(epochs=epochs, size=size, batch_size=batch_size, model=model)
    overrides = overrides.override_strings(sets) if sets else overrides
    changed = {k: v for k, v in overrides.to_dict().items() if v != TrainConfig().to_dict()[k]}
    tracking = None
    if not no_track:
        from m2snet.mlops.mlflow_store import TrackingConfig

        tracking = TrackingConfig(uri=tracking_uri, experiment=experiment)
    if train and not test:
        raise M2SNetError("--train replaces the protocol's split: give its test set(s) with --test NAME=SELECTOR")
    split_options = {"tests": parse_test_sets(test), **({"train": train} if train else {})} if test else None
    res = benchmark(protocol, data, out, fmt=fmt, train_overrides=changed, seed=seed, tracking=tracking,
                    log_model=not no_log_model, split_options=split_options)
    typer.echo(res.table_md.read_text())
    typer.echo(res.comparison_md.read_text())
    if res.run_id:
        typer.echo(f"mlflow run: {res.run_id}")
    if res.registered:
        typer.echo(f"registered model: {res.registered}")


@app.command("paper-compare")
def paper_compare_cmd(
    results: Path = typer.Argument(..., help="test_sets.json of a fixed-split run, or cv_summary.json of a CV."),
    protocol: str = typer.Option(..., "--protocol", help="busi, polyp, polyp-video, covid or oct."),
    out: Optional[Path] = typer.Option(None, "--out", help="Also write the report to this markdown file."),
) -> None:
    """Ours beside the paper's M2SNet figures for a finished run, with the difference and the budget."""
    from m2snet.files import write_text
    from m2snet.workflows.paper import comparison_from_results

    text = comparison_from_results(protocol, results)
    if out is not None:
        write_text(out, text + "\n")
    typer.echo(text)
