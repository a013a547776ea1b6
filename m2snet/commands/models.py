"""CLI commands of the model area: model-info, convert-reference, list-models, export."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer


def model_info_command(
    name: str = typer.Argument("m2snet", help="Registered model name (see `m2snet list-models`)."),
    size: int = typer.Option(352, "--size", help="Square input size for the MAC count."),
    n_classes: int = typer.Option(1, "--n-classes", help="Output classes."),
    msu_impl: str = typer.Option("fast", "--msu-impl", help="m2snet only: fast | dense."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """Trainable / fixed parameters and GMACs (torch.utils.flop_counter, MACs = FLOPs / 2)."""
    from m2snet.models.info import model_info

    config = {"msu_impl": msu_impl} if msu_impl != "fast" else {}
    info = model_info(name, size=size, n_classes=n_classes, **config)
    if as_json:
        typer.echo(json.dumps(info.to_dict(), indent=2))
        return
    typer.echo(f"model             {info.name} {info.config or ''}".rstrip())
    typer.echo(f"input             1 x 3 x {size} x {size}, n_classes {n_classes}")
    typer.echo(f"trainable params  {info.trainable_params / 1e6:.2f} M ({info.trainable_params:,})")
    typer.echo(f"fixed params      {info.fixed_params / 1e6:.2f} M ({info.fixed_params:,})")
    typer.echo(f"GMACs             {info.gmacs:.2f}")


def convert_reference_command(
    ckpt: Path = typer.Argument(..., help="Checkpoint of the authors' reference code (.pth)."),
    out: Path = typer.Argument(..., help="Where to write the m2snet checkpoint."),
    model: Optional[str] = typer.Option(None, "--model", help="m2snet | msnet (default: from the keys)."),
) -> None:
    """Convert an official MSNet / M2SNet checkpoint into an m2snet checkpoint."""
    from m2snet.models.reference import convert_reference

    path = convert_reference(ckpt, out, model=model)
    typer.echo(f"wrote {path}")


def list_models_command() -> None:
    """List the registered model names."""
    from m2snet.models import list_models

    for name in list_models():
        typer.echo(name)


def export_command(
    sources: List[str] = typer.Argument(..., help="Checkpoint file(s) (an ensemble) or one model URI "
                                                   "(models:/NAME@production, runs:/..., a model directory)."),
    out: Path = typer.Option(..., "--out", "-o", help="The .onnx file to write."),
    tta_flip: bool = typer.Option(False, "--tta-flip", help="Average with the horizontally flipped pass."),
    atol: Optional[float] = typer.Option(None, "--atol", help="Max |ONNX Runtime - PyTorch| on probabilities."),
) -> None:
    """Export a checkpoint or a fold ensemble as ONNX (BatchNorm folded), checked against PyTorch."""
    import tempfile

    from m2snet.export import DEFAULT_ATOL, export_onnx, model_checkpoints

    with tempfile.TemporaryDirectory(prefix="m2snet-export-") as tmp:
        paths = [Path(s) for s in sources]
        if len(sources) == 1 and not paths[0].is_file():
            paths = model_checkpoints(sources[0], tmp)
        report = export_onnx(paths, out, tta_flip=tta_flip, atol=DEFAULT_ATOL if atol is None else atol)
    typer.echo(f"wrote {report.path}: {report.n_models} model(s) at {report.image_size} px, "
               f"max |ONNX Runtime - PyTorch| {report.max_abs_diff:.2e}, BatchNorm nodes left {report.batch_norms_left}")


def register(app: typer.Typer) -> None:
    """Add this area's commands to the root `m2snet` app."""
    app.command("model-info")(model_info_command)
    app.command("convert-reference")(convert_reference_command)
    app.command("list-models")(list_models_command)
    app.command("export")(export_command)
