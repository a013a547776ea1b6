"""Option types and parsers shared by the CLI's sub-apps (one definition each)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer

from m2snet.errors import M2SNetError
from m2snet.evaluation.metrics import DEFAULT_PROTOCOL, PROTOCOLS
from m2snet.mlops import mlflow_store
from m2snet.workflows.presets import DEFAULT_MODEL_NAME, DEFAULT_PRESET, PRESETS, train_config

# TrainConfig
CONFIG: Optional[Path] = typer.Option(None, "--config", help="TrainConfig as JSON/YAML; options below override it.")
SETS: list[str] = typer.Option([], "--set", help="Override any TrainConfig field: --set key=value (repeatable).")

# Splits (m2snet.data.split.check_split): a split made for another version of the data, used only when named.
ACCEPT_SPLIT_VERSION: Optional[str] = typer.Option(
    None, "--accept-split-version", metavar="VERSION",
    help="Use a split made for another dataset version: name the version it records (its dataset_version); "
         "the run records it.")

# Presets (m2snet.workflows.presets)
PRESET: str = typer.Option(DEFAULT_PRESET, "--preset", help=f"{' | '.join(PRESETS)} (m2snet.workflows.presets).")
TRAIN_PRESET: Optional[str] = typer.Option(
    None, "--preset", help=f"Start from a pipeline preset's training settings ({' | '.join(PRESETS)}); "
                           "default: TrainConfig's (the paper's recipe).")

# MLflow
TRACKING_URI: Optional[str] = typer.Option(
    None, "--tracking-uri", help="MLflow tracking URI (default $MLFLOW_TRACKING_URI or sqlite:///mlflow.db).")
NO_TRACK: bool = typer.Option(False, "--no-track", help="Do not log to MLflow.")
PIPELINE_EXPERIMENT: str = typer.Option(mlflow_store.PIPELINE_EXPERIMENT, "--experiment", help="MLflow experiment.")
MODEL_NAME: str = typer.Option(DEFAULT_MODEL_NAME, "--model-name", help="Registered model name.")

# Evaluation (m2snet.evaluation.metrics)
METRIC_PROTOCOL: str = typer.Option(
    DEFAULT_PROTOCOL, "--metric-protocol",
    help=f"{' | '.join(PROTOCOLS)}: this project's thresholded metrics, or the paper's test_score.py (uint8 "
         "truncation, per-image min-max, soft Dice; to compare with the paper's tables).")


def preset_overrides(preset: str, sets: list[str]) -> dict[str, Any]:
    """``--set key=value`` strings typed by TrainConfig on top of ``preset`` (only the keys given are returned)."""
    if not sets:
        return {}

    keys = [s.partition("=")[0].strip().replace("-", "_") for s in sets]
    changed = train_config(preset).override_strings(sets).to_dict()
    return {k: changed[k] for k in keys}


def parse_folds(text: Optional[str]) -> Optional[list[int]]:
    """``--folds 0,2`` -> [0, 2]; empty = all folds."""
    if not text:
        return None
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise M2SNetError(f"--folds {text!r}: expected comma-separated fold numbers like 0,1") from None


def parse_seeds(text: Optional[str]) -> Optional[list[int]]:
    """``--seeds 42,43,44`` -> [42, 43, 44]; empty = the config's one seed."""
    from m2snet.workflows.fold_tasks import parse_seeds as parse

    return parse(text, "--seeds") or None
