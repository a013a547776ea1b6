"""`m2snet promote` / `m2snet rollback`: move the registry's `production` alias by hand."""

from __future__ import annotations

import typer

from m2snet.mlops.promotion_gate import PromotionPolicy
from m2snet.mlops.registry import promote, rollback

app = typer.Typer()


@app.command("promote")
def promote_cmd(
    name: str = typer.Argument(..., help="Registered model name."),
    version: str = typer.Argument(..., help="Version to promote."),
    floor: float = typer.Option(PromotionPolicy.floor, help="Minimum CV Dice (0..1)."),
    margin: float = typer.Option(PromotionPolicy.margin, help="Required improvement over production's CV Dice (0..1)."),
    noskill_margin: float = typer.Option(PromotionPolicy.noskill_margin, help="Required improvement over the "
                                         "no-skill (all-background) predictor's CV Dice (0..1)."),
    force: bool = typer.Option(False, "--force", help="Skip the quality gate."),
    require_ci: bool = typer.Option(False, "--require-ci", help="Statistical gate: beat production with the paired "
                                    "95 % CI of the per-case Dice difference above zero (same data and split; "
                                    "else the margin rule)."),
) -> None:
    """Move alias `production` to VERSION if it passes the gate (the replaced one becomes `previous`)."""
    policy = PromotionPolicy(floor=floor, margin=margin, noskill_margin=noskill_margin, require_ci=require_ci)
    decision = promote(name, version, policy, force=force)
    typer.echo(("promoted" if decision.promoted else "not promoted") + f": {name} v{version}: {decision.reason}")
    if not decision.promoted:
        raise typer.Exit(1)


@app.command("rollback")
def rollback_cmd(name: str = typer.Argument(..., help="Registered model name.")) -> None:
    """Point `production` back at `previous`."""
    decision = rollback(name)
    typer.echo(f"{name}: production {decision.production_version} -> {decision.version}")
