"""`m2snet tune`: an Optuna study of the learning rates on one fold's inner split (shareable storage)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer

from m2snet.cli.options import ACCEPT_SPLIT_VERSION, PRESET, SETS, preset_overrides
from m2snet.workflows.presets import get_preset, train_config

app = typer.Typer()


@app.command("tune")
def tune_cmd(
    data: Path = typer.Option(..., help="Dataset directory (m2snet format)."),
    split: Path = typer.Option(..., help="Split file (m2snet data split)."),
    fold: int = typer.Option(0, help="Fold whose training cases are split into inner train/val."),
    accept_split_version: Optional[str] = ACCEPT_SPLIT_VERSION,
    preset: str = PRESET,
    set_: List[str] = SETS,
    trials: int = typer.Option(20, help="Finished trials wanted in the study (all workers together)."),
    epochs: Optional[int] = typer.Option(None, help="Epochs per trial (default: the preset's tuning epochs)."),
    storage: str = typer.Option("", help="sqlite:///FILE, journal:PATH or postgresql+psycopg2://... "
                                "(shared by workers)."),
    study: str = typer.Option("m2snet", help="Study name (workers with the same name and storage share it)."),
    out: Path = typer.Option(Path("runs/tune"), help="Work directory (trial checkpoints, plots, best_params.json)."),
    experiment: str = typer.Option("m2snet-tuning", help="MLflow experiment."),
) -> None:
    """Tune the head learning rate and backbone/head ratio with Optuna (pruning on per-epoch Dice)."""
    from m2snet.mlops.mlflow_store import TrackingConfig
    from m2snet.mlops.tracking import Tracker
    from m2snet.workflows.tuning import make_storage, tune

    base = train_config(preset, preset_overrides(preset, set_), data=str(data), split=str(split), fold=fold,
                        out_dir=str(out / "unused")).override(accept_split_version=accept_split_version)
    cfg = get_preset(preset).tuning_config(n_trials=trials, storage=storage or None, study_name=study, seed=base.seed,
                                           **({"epochs": epochs} if epochs else {}))
    if cfg.storage:  # a storage that cannot be opened is refused before an MLflow run is started for the study
        make_storage(cfg.storage)
    parent = Tracker.start(TrackingConfig(experiment=experiment), run_name=f"study-{study}",
                           tags={"m2snet.kind": "study"})
    with parent:
        result = tune(base, cfg, out, parent=parent)
    typer.echo(json.dumps(result.to_dict(), indent=2))
