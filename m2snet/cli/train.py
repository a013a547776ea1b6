"""CLI: ``m2snet train``, ``m2snet evaluate``, ``m2snet cv``.

Every training knob is a field of m2snet.training.config.TrainConfig: give a JSON/YAML file with
``--config`` and override single fields with ``--set key=value`` (or the common shortcuts below).
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from m2snet.cli.options import (
    ACCEPT_SPLIT_VERSION,
    CONFIG,
    METRIC_PROTOCOL,
    NO_TRACK,
    SETS,
    TRACKING_URI,
    TRAIN_PRESET,
    parse_folds,
    parse_seeds,
)
from m2snet.errors import M2SNetError
from m2snet.mlops.mlflow_store import CLI_EXPERIMENT

app = typer.Typer()

# A stand-alone training run's experiment (the pipeline's is options.PIPELINE_EXPERIMENT).
EXPERIMENT = typer.Option(CLI_EXPERIMENT, "--experiment", help="MLflow experiment name.")


def _config(config: Optional[Path], sets: List[str], preset: Optional[str] = None, **shortcuts):
    """The TrainConfig (``--config`` file, or ``--preset``'s training settings, or TrainConfig's defaults; then
    the user's options) and the fields the user set explicitly (``--set`` and the shortcuts): they win over tuned
    values (presets.settle_config)."""
    from m2snet.training.config import TrainConfig
    from m2snet.workflows.presets import train_config

    if config and preset:
        raise M2SNetError("--config and --preset both give the base settings; choose one (and --set on top)")
    cfg = TrainConfig.from_file(config) if config else train_config(preset) if preset else TrainConfig()
    cfg = cfg.override(**shortcuts)
    explicit = {k for k, v in shortcuts.items() if v is not None}
    explicit |= {s.partition("=")[0].strip().replace("-", "_") for s in sets}
    return (cfg.override_strings(sets) if sets else cfg), frozenset(explicit)


def _context(no_track: bool, uri: Optional[str], experiment: str, parent_run_id: Optional[str] = None):
    from m2snet.workflows.context import RunContext

    return RunContext.for_cli(uri, experiment, track=not no_track, parent_run_id=parent_run_id)


def _is_fixed(split: str) -> bool:
    from m2snet.data.split import load_split

    return load_split(split).is_fixed


@app.command("train")
def train_cmd(
    data: Optional[Path] = typer.Option(None, "--data", help="Dataset directory (m2snet layout)."),
    split: Optional[Path] = typer.Option(None, "--split", help="Split file; trains on fold --fold's train cases."),
    fold: Optional[int] = typer.Option(None, "--fold"),
    accept_split_version: Optional[str] = ACCEPT_SPLIT_VERSION,
    model: Optional[str] = typer.Option(None, "--model", help="Registered model name (m2snet, msnet, unet, ...)."),
    epochs: Optional[int] = typer.Option(None, "--epochs"),
    size: Optional[int] = typer.Option(None, "--size"),
    batch_size: Optional[int] = typer.Option(None, "--batch-size"),
    device: Optional[str] = typer.Option(None, "--device"),
    out: Optional[Path] = typer.Option(None, "--out", help="Run directory (checkpoints, logs, evaluation)."),
    config: Optional[Path] = CONFIG,
    preset: Optional[str] = TRAIN_PRESET,
    sets: List[str] = SETS,
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out from last.pt."),
    tta_flip: bool = typer.Option(False, "--tta-flip", help="Flip test-time augmentation in the final evaluation."),
    tracking_uri: Optional[str] = TRACKING_URI,
    experiment: str = EXPERIMENT,
    no_track: bool = NO_TRACK,
) -> None:
    """Train one model (one fold of a split, or all cases); evaluate the selected checkpoint on the fold.

    With a fixed split (`data split --protocol fixed`): train on its training set (its validation set
    scored every epoch) and evaluate every named test set: one table row per set plus their mean.

    The checkpoint is the final epoch's (--set selection=inner: the best epoch on an inner split of
    the fold's training cases); the fold's validation cases never choose it."""
    import contextlib

    from m2snet.mlops.tracking import Tracker
    from m2snet.mlops.training_run import tracking_callbacks
    from m2snet.training.trainer import train
    from m2snet.workflows.fold_tasks import FoldTask
    from m2snet.workflows.folds import FoldOptions, ScoreOptions, fold_run, run_fold

    cfg, explicit = _config(config, sets, preset, data=str(data) if data else None,
                            split=str(split) if split else None,
                            fold=fold, model=model, epochs=epochs, size=size, batch_size=batch_size, device=device,
                            out_dir=str(out) if out else None, accept_split_version=accept_split_version)
    ctx = _context(no_track, tracking_uri, experiment)
    tracking = ctx.tracking
    if cfg.split and _is_fixed(cfg.split):
        from m2snet.workflows.protocols import run_fixed

        res = run_fixed(cfg, cfg.out_dir, tracking=tracking, tta_flip=tta_flip, resume=resume)
        typer.echo(f"checkpoint: {res.checkpoint} (selection={cfg.selection}, epoch {res.selected_epoch})")
        typer.echo(res.report.table())
        typer.echo(f"table: {res.table_md}" + (f"\nmlflow run {res.run_id}" if res.run_id else ""))
        return
    if cfg.split:
        fr = run_fold(cfg, FoldTask(cfg.fold), cfg.out_dir, ctx=ctx,
                      options=FoldOptions(explicit=explicit, resume=resume, score=ScoreOptions(tta_flip=tta_flip)))
        typer.echo(f"checkpoint: {fr.checkpoint} (selection={cfg.selection}, epoch {fr.selected_epoch})")
        typer.echo("validation: " + ", ".join(f"{k}={v:.4f}" for k, v in fr.metrics.items()))
        if fr.model_uri:
            typer.echo(f"mlflow run {fr.run_id}, model {fr.model_uri}")
        return
    tracker = None
    if tracking is not None:
        tracker = (fold_run(cfg.out_dir, tracking) if resume else None) or Tracker.start(
            tracking, run_name=f"train-{cfg.model}")
    with tracker or contextlib.nullcontext():
        result = train(cfg, resume=resume, callbacks=tracking_callbacks(tracker))
        if tracker is not None:
            from m2snet.mlops.pyfunc_logging import log_segmentation_model

            tracker.log_artifact(result.checkpoint, "checkpoints")
            log_segmentation_model([result.checkpoint], run_id=tracker.run_id,
                                   tracking_uri=tracking.resolved_uri())
    typer.echo(f"checkpoint: {result.checkpoint} (selection={cfg.selection}, epoch {result.selected_epoch})")

@app.command("evaluate")
def evaluate_cmd(
    checkpoint: List[Path] = typer.Option([], "--checkpoint", help="Checkpoint(s); several = ensemble."),
    data: Path = typer.Option(..., "--data", help="Dataset directory."),
    split: Optional[Path] = typer.Option(None, "--split", help="Split file: evaluate on fold --fold's val cases."),
    fold: Optional[int] = typer.Option(None, "--fold", help="Fold of --split (default 0; with --no-skill: all)."),
    accept_split_version: Optional[str] = ACCEPT_SPLIT_VERSION,
    out: Path = typer.Option(Path("eval"), "--out", help="Where per_case.csv, metrics.json, overlays.png go."),
    tta_flip: bool = typer.Option(False, "--tta-flip", help="Average with the horizontally flipped prediction."),
    device: str = typer.Option("auto", "--device"),
    batch_size: int = typer.Option(8, "--batch-size"),
    protocol: str = METRIC_PROTOCOL,
    no_skill: bool = typer.Option(False, "--no-skill", help="Score the all-background predictor instead of a "
                                  "checkpoint (no training); with --split: every fold's table."),
) -> None:
    """Score checkpoint(s) at each case's original size; write per-case CSV, means and overlays.

    With a fixed split: every named test set (``OUT/<set>/``), one row each plus their mean (test_sets.md)."""
    from m2snet.evaluation.evaluate import EvalOptions, evaluate

    if no_skill:
        from m2snet.workflows.cv import noskill_cv

        if checkpoint:
            raise M2SNetError("evaluate: --no-skill scores the all-background predictor; drop --checkpoint")
        summary = noskill_cv(data, split, None if fold is None else [fold], out, protocol=protocol,
                             accept_split_version=accept_split_version)
        typer.echo(summary.table(title="no skill"))
        typer.echo(f"tables: {out / 'cv_table.md'}, {out / 'cv_summary.json'}")
        return
    if not checkpoint:
        raise M2SNetError("evaluate: give --checkpoint (or --no-skill)")
    case_ids = None
    if split:
        from m2snet.data.format import load_dataset
        from m2snet.data.split import load_split

        loaded = load_split(split, load_dataset(data), accept_version=accept_split_version)
        if loaded.is_fixed:
            from m2snet.evaluation.testsets import evaluate_split_test_sets

            report = evaluate_split_test_sets(checkpoint, data, loaded, out, tta_flip=tta_flip, device=device,
                                              batch_size=batch_size, progress=True, protocol=protocol)
            _, table_md = report.write(out)
            typer.echo(report.table())
            typer.echo(f"table: {table_md}")
            return
        case_ids = list(loaded.fold(fold or 0).val)
    res = evaluate(checkpoint, data, case_ids=case_ids, out_dir=out,
                   options=EvalOptions(tta_flip=tta_flip, device=device, batch_size=batch_size, protocol=protocol))
    for k, v in res.metrics.items():
        typer.echo(f"{k:>20s}: {v:.4f}")
    typer.echo(f"per-case CSV: {res.per_case_csv}\noverlays: {res.overlay_png}")

@app.command("cv")
def cv_cmd(
    data: Optional[Path] = typer.Option(None, "--data"),
    split: Optional[Path] = typer.Option(None, "--split"),
    accept_split_version: Optional[str] = ACCEPT_SPLIT_VERSION,
    folds: Optional[str] = typer.Option(None, "--folds", help="Comma-separated folds (default: all)."),
    seeds: Optional[str] = typer.Option(None, "--seeds", help="Repeat the CV once per seed (comma-separated, "
                                        "e.g. 42,43,44): initialisation and data order change, the cases do not; "
                                        "the table is mean ± std over seeds × folds."),
    model: Optional[str] = typer.Option(None, "--model"),
    epochs: Optional[int] = typer.Option(None, "--epochs"),
    size: Optional[int] = typer.Option(None, "--size"),
    batch_size: Optional[int] = typer.Option(None, "--batch-size"),
    device: Optional[str] = typer.Option(None, "--device"),
    out: Path = typer.Option(Path("runs/cv"), "--out"),
    config: Optional[Path] = CONFIG,
    preset: Optional[str] = TRAIN_PRESET,
    sets: List[str] = SETS,
    resume: bool = typer.Option(False, "--resume", help="Resume unfinished folds in --out."),
    parent_run_id: Optional[str] = typer.Option(None, "--parent-run-id",
                                                help="Attach folds to this CV run (folds as separate jobs)."),
    tta_flip: bool = typer.Option(False, "--tta-flip"),
    tune_trials: int = typer.Option(0, "--tune-trials", help="Nested tuning: an Optuna study of N trials per "
                                    "fold on an inner split of that fold's training cases (0 = no tuning)."),
    tune_epochs: Optional[int] = typer.Option(None, "--tune-epochs", help="Epochs per trial (default: --epochs)."),
    no_log_model: bool = typer.Option(False, "--no-log-model", help="Do not log a pyfunc model per fold."),
    protocol: str = METRIC_PROTOCOL,
    tracking_uri: Optional[str] = TRACKING_URI,
    experiment: str = EXPERIMENT,
    no_track: bool = NO_TRACK,
) -> None:
    """Cross-validate: train + evaluate each fold; print Jaccard/Precision/Recall/Specificity/Dice mean ± std (%)."""
    from m2snet.workflows.cv import run_cv
    from m2snet.workflows.folds import FoldOptions, ScoreOptions

    cfg, explicit = _config(config, sets, preset, data=str(data) if data else None,
                            split=str(split) if split else None,
                            model=model, epochs=epochs, size=size, batch_size=batch_size, device=device,
                            accept_split_version=accept_split_version)
    seed_list = parse_seeds(seeds)
    tuning = None
    if tune_trials > 0:
        from m2snet.workflows.tuning import TuningConfig

        tuning = TuningConfig(n_trials=tune_trials, epochs=tune_epochs, seed=cfg.seed)
    options = FoldOptions(explicit=explicit, resume=resume, log_model=not no_log_model, tuning=tuning,
                          score=ScoreOptions(protocol=protocol, tta_flip=tta_flip))
    res = run_cv(cfg, out, parse_folds(folds), ctx=_context(no_track, tracking_uri, experiment, parent_run_id),
                 options=options, seeds=seed_list or ())
    typer.echo(res.summary.table(title=cfg.model + (f" ({len(seed_list)} seeds)" if len(seed_list or []) > 1 else "")))
    if res.parent_run_id:
        typer.echo(f"mlflow parent run: {res.parent_run_id}")
