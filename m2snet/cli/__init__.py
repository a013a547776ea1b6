"""The one ``m2snet`` command. Each area registers its sub-commands from ``m2snet.cli``.

Heavy libraries (torch, mlflow, kfp) are imported inside the command functions so that
``m2snet --help`` stays fast.
"""

from __future__ import annotations

import logging
import sys

import typer

from m2snet.cli import data as data_commands
from m2snet.cli import models as model_commands
from m2snet.cli import pipeline as pipeline_commands
from m2snet.cli import services as service_commands
from m2snet.cli import train as train_commands
from m2snet.common import M2SNetError, Terminated

app = typer.Typer(
    name="m2snet",
    help="Train, tune, compare, track, register and serve M2SNet segmentation models.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


@app.callback()
def _root(verbose: bool = typer.Option(False, "--verbose", "-v", help="Debug logging.")) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )


model_commands.register(app)
data_commands.register(app)
train_commands.register(app)
pipeline_commands.register(app)
service_commands.register(app)


def main() -> None:
    """Entry point: user errors print one clear line and exit 2, never a traceback."""
    try:
        app()
    except M2SNetError as err:
        typer.secho(f"error: {err}", fg=typer.colors.RED, err=True)
        sys.exit(2)
    except Terminated:
        # SIGTERM during an atomic write: the partial output is already removed; exit as SIGTERM would.
        typer.secho("terminated: partial output removed", fg=typer.colors.RED, err=True)
        sys.exit(128 + 15)


if __name__ == "__main__":
    main()
