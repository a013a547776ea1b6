"""`m2snet predict`: masks and overlays from a registered (or any MLflow) model."""

from __future__ import annotations

from pathlib import Path
from typing import List

import typer

app = typer.Typer()


@app.command("predict")
def predict_cmd(
    images: List[Path] = typer.Argument(..., help="Image files or folders."),
    model: str = typer.Option(..., "--model", help="Model URI, e.g. models:/m2snet-busi@production."),
    out: Path = typer.Option(Path("predictions"), "--out", help="Output folder for masks and overlays."),
    batch_size: int = typer.Option(8, help="Images per forward pass."),
) -> None:
    """Write <name>_mask.png and <name>_overlay.png for every image."""
    from m2snet.mlops.serving import predict_files

    results = predict_files(model, images, out, batch_size=batch_size)
    for r in results:
        typer.echo(f"{r.image} -> {r.mask.name}, {r.overlay.name} (foreground {100 * r.foreground_fraction:.1f}%)")
    typer.echo(f"{len(results)} image(s) -> {out}")
