"""CLI commands of the model area: model-info, convert-reference, upgrade-checkpoint, recalibrate-bn, list-models,
export."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import List, Optional

import typer

from m2snet.cli.options import ACCEPT_SPLIT_VERSION
from m2snet.errors import M2SNetError

app = typer.Typer()


@app.command("model-info")
def model_info_command(
    name: str = typer.Argument("m2snet", help="Registered model name (see `m2snet list-models`)."),
    size: int = typer.Option(352, "--size", help="Square input size for the MAC count."),
    n_classes: int = typer.Option(1, "--n-classes", help="Output classes."),
    msu_impl: str = typer.Option("fast", "--msu-impl", help="m2snet only: fast | dense."),
    msu_norm: Optional[str] = typer.Option(None, "--msu-norm",
                                           help="m2snet only: per_site | shared (default: per_site)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """Trainable / fixed parameters and GMACs (torch.utils.flop_counter, MACs = FLOPs / 2)."""
    from m2snet.models.info import model_info

    config = {"msu_impl": msu_impl} if msu_impl != "fast" else {}
    if msu_norm is not None:
        config["msu_norm"] = msu_norm
    try:
        info = model_info(name, size=size, n_classes=n_classes, **config)
    except ValueError as err:
        raise M2SNetError(f"model-info {name}: {err}") from err
    if as_json:
        typer.echo(json.dumps(info.to_dict(), indent=2))
        return
    typer.echo(f"model             {info.name} {info.config or ''}".rstrip())
    typer.echo(f"input             1 x 3 x {size} x {size}, n_classes {n_classes}")
    typer.echo(f"trainable params  {info.trainable_params / 1e6:.2f} M ({info.trainable_params:,})")
    typer.echo(f"fixed params      {info.fixed_params / 1e6:.2f} M ({info.fixed_params:,})")
    typer.echo(f"GMACs             {info.gmacs:.2f}")


@app.command("convert-reference")
def convert_reference_command(
    ckpt: Path = typer.Argument(..., help="Checkpoint of the authors' reference code (.pth)."),
    out: Path = typer.Argument(..., help="Where to write the m2snet checkpoint."),
    model: Optional[str] = typer.Option(None, "--model", help="m2snet | msnet (default: from the keys)."),
) -> None:
    """Convert an official MSNet / M2SNet checkpoint into an m2snet checkpoint."""
    from m2snet.models.reference import convert_reference

    path = convert_reference(ckpt, out, model=model)
    typer.echo(f"wrote {path}")


@app.command("upgrade-checkpoint")
def upgrade_checkpoint_command(
    checkpoint: Path = typer.Argument(..., help="An m2snet checkpoint written before weights-only loading."),
    out: Path = typer.Option(..., "--out", help="Where to write the plain-data checkpoint."),
) -> None:
    """Rewrite an older m2snet checkpoint (numpy RNG state in last.pt) as tensors and plain data, so it
    loads (and resumes) again; anything but those numpy types is still refused, never unpickled."""
    from m2snet.models.checkpoint import upgrade_checkpoint

    typer.echo(f"wrote {upgrade_checkpoint(checkpoint, out)}")


@app.command("recalibrate-bn")
def recalibrate_bn_command(
    checkpoint: Path = typer.Argument(..., help="m2snet checkpoint (trained, or from convert-reference)."),
    data: Path = typer.Option(..., "--data", help="Dataset directory (m2snet layout)."),
    split: Optional[Path] = typer.Option(None, "--split", help="Split file: use fold --fold's training cases "
                                         "(default: all cases of --data)."),
    fold: int = typer.Option(0, "--fold"),
    accept_split_version: Optional[str] = ACCEPT_SPLIT_VERSION,
    out: Path = typer.Option(..., "--out", help="Where to write the recalibrated checkpoint."),
    msu_norm: str = typer.Option("per_site", "--msu-norm", help="m2snet: per_site (upgrades a shared / "
                                 "reference checkpoint) | shared | keep (the checkpoint's mode)."),
    size: Optional[int] = typer.Option(None, "--size", help="Input size (default: the checkpoint's)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Default: the run's training batch size."),
    max_cases: Optional[int] = typer.Option(None, "--max-cases", help="Use at most N training cases (seeded)."),
    device: str = typer.Option("auto", "--device"),
) -> None:
    """Re-estimate a checkpoint's BatchNorm statistics over the fold's training cases (no augmentation,
    cumulative average; per call site for M2SNet's MSU filters) and write a new checkpoint."""
    from m2snet.training.bn_recalibration import RecalibrationOptions, recalibrate_checkpoint

    path, info = recalibrate_checkpoint(checkpoint, out, data=data, options=RecalibrationOptions(
        split=split, fold=fold, accept_split_version=accept_split_version,
        msu_norm=None if msu_norm == "keep" else msu_norm,
        size=size, batch_size=batch_size, max_cases=max_cases, device=device))
    mode = f", msu_norm {info['msu_norm']}" if info.get("msu_norm") else ""
    typer.echo(f"recalibrated {info['norms']} BatchNorms over {info['images']} of {info['cases']} training cases "
               f"({info['batches']} batches at {info['size']} px{mode})")
    typer.echo(f"wrote {path}")


@app.command("list-models")
def list_models_command() -> None:
    """List the registered model names."""
    from m2snet.models import list_models

    for name in list_models():
        typer.echo(name)


@app.command("export")
def export_command(
    sources: List[str] = typer.Argument(..., help="Checkpoint file(s) (an ensemble) or one model URI "
                                                   "(models:/NAME@production, runs:/..., a model directory)."),
    out: Path = typer.Option(..., "--out", "-o", help="The file to write (.onnx; a torch bundle for bf16)."),
    precision: str = typer.Option("fp32", "--precision", help="fp32 (ONNX) | int8 (ONNX Runtime static "
                                  "quantization) | bf16 (PyTorch CPU autocast bundle)."),
    data: Optional[Path] = typer.Option(None, "--data", help="bf16/int8: dataset directory (m2snet layout)."),
    split: Optional[Path] = typer.Option(None, "--split", help="bf16/int8: split file; fold --fold's training "
                                         "cases calibrate int8, its validation cases measure the accuracy cost."),
    fold: int = typer.Option(0, "--fold"),
    accept_split_version: Optional[str] = ACCEPT_SPLIT_VERSION,
    budget: Optional[float] = typer.Option(None, "--budget", help="Dice points (0-100) the reduced precision "
                                           "may lose against fp32 on the held-out cases (default 0.5)."),
    warn_only: bool = typer.Option(False, "--warn-only", help="Past the budget: write it with a warning "
                                   "instead of refusing."),
    calibration_cases: Optional[int] = typer.Option(None, "--calibration-cases",
                                                    help="int8: training cases to calibrate on (default 64)."),
    max_check_cases: Optional[int] = typer.Option(None, "--max-check-cases",
                                                  help="Score at most N held-out cases (default: all)."),
    tta_flip: bool = typer.Option(False, "--tta-flip", help="Average with the horizontally flipped pass."),
    atol: Optional[float] = typer.Option(None, "--atol", help="Max |ONNX Runtime - PyTorch| on probabilities."),
) -> None:
    """Export a checkpoint or a fold ensemble (BatchNorm folded) at fp32, bf16 or int8; a reduced precision
    reports its accuracy cost against fp32 on held-out cases and is refused past the budget."""
    from m2snet.mlops.export import DEFAULT_ATOL, model_checkpoints
    from m2snet.mlops.precision import DEFAULT_CALIBRATION_CASES, DEFAULT_DICE_BUDGET, FoldData, export_model

    if (data is None) != (split is None):
        raise M2SNetError("export: give --data and --split together")
    fold_data = FoldData(data, split, fold, accept_split_version) if data is not None else None
    with tempfile.TemporaryDirectory(prefix="m2snet-export-") as tmp:
        paths = [Path(s) for s in sources]
        if len(sources) == 1 and not paths[0].is_file():
            paths = model_checkpoints(sources[0], tmp)
        report = export_model(
            paths, out, precision, fold_data=fold_data,
            tta_flip=tta_flip, atol=DEFAULT_ATOL if atol is None else atol,
            budget=DEFAULT_DICE_BUDGET if budget is None else budget, over_budget="warn" if warn_only else "refuse",
            n_calibration=DEFAULT_CALIBRATION_CASES if calibration_cases is None else calibration_cases,
            max_check_cases=max_check_cases)
    typer.echo(f"wrote {report.path}: {report.n_models} model(s) at {report.image_size} px, {report.precision}"
               + (f", calibrated on {report.calibration_cases} training cases" if report.calibration_cases else ""))
    for line in report.lines:
        typer.echo(line)
    if report.cost is not None and not report.cost.within_budget:
        typer.secho(f"WARNING: {report.precision} loses {report.cost.delta:.2f} Dice points against fp32, over the "
                    f"budget of {report.cost.budget:g}", err=True, fg="red", bold=True)
