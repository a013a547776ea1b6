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
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object per image (path, masks, guard)."),
) -> None:
    """Write <name>_mask.png and <name>_overlay.png for every image; with the model's input guard, warn for
    every image unlike the ones it was trained on (its mask is not to be trusted)."""
    import json

    from m2snet.mlops.serving import predict_files

    results = predict_files(model, images, out, batch_size=batch_size)
    for r in results:
        if as_json:
            typer.echo(json.dumps({"image": str(r.image), "mask": str(r.mask), "overlay": str(r.overlay),
                                   "foreground_fraction": r.foreground_fraction, "ood_score": r.ood_score,
                                   "ood_threshold": None if r.ood_score is None else 1.0, "ood_flag": r.ood_flag}))
            continue
        typer.echo(f"{r.image} -> {r.mask.name}, {r.overlay.name} (foreground {100 * r.foreground_fraction:.1f}%"
                   + ("" if r.ood_score is None else f", input guard {r.ood_score:.2f}") + ")")
    flagged = [r for r in results if r.ood_flag]
    for r in flagged:
        typer.secho(f"warning: {r.image}: unlike the images this model was trained on (input guard score "
                    f"{r.ood_score:.2f} > 1); its mask is not to be trusted", fg=typer.colors.YELLOW, err=True)
    if not as_json:
        guard = "no input guard in this model" if results and results[0].ood_score is None else \
            f"{len(flagged)} flagged by the input guard"
        typer.echo(f"{len(results)} image(s) -> {out} ({guard})")
