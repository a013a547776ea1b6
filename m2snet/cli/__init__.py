"""The one ``m2snet`` command, assembled from one sub-app per area.

Every area module defines ``app = typer.Typer()`` with ``@app.command`` functions; the root mounts
groups under a name (``m2snet data ...``, ``m2snet pipeline ...``, ``m2snet services ...``) and
merges the rest as top-level commands (``m2snet train``, ``m2snet promote``, ...). Option types
shared between areas live in :mod:`m2snet.cli.options`.

Heavy libraries (torch, mlflow, kfp, optuna) are imported inside the command functions, so that
``m2snet --help`` and a mistyped option answer in a fraction of a second.
"""

from __future__ import annotations

import logging
import sys

import typer

from m2snet.cli import benchmark, compare, data, models, pipeline, predict, registry, services, train, tune
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


# Groups: `m2snet <group> <command>`.
app.add_typer(data.app, name="data")
app.add_typer(pipeline.app, name="pipeline")
app.add_typer(services.app, name="services")
# Top-level commands: `m2snet <command>`.
for area in (models, train, tune, compare, registry, predict, benchmark):
    app.add_typer(area.app)


def main() -> None:
    """Entry point: user errors print one clear line and exit 2, never a traceback."""
    try:
        app()
    except M2SNetError as err:
        typer.secho(f"error: {err}", fg=typer.colors.RED, err=True)
        sys.exit(2)
    except OSError as err:
        # A path the user gave could not be read or written (permissions, /proc, a full disk, a file where
        # a folder is needed): the same one line; --verbose logs the traceback for a real bug.
        logging.getLogger("m2snet.cli").debug("traceback of the error below", exc_info=True)
        where = f"{err.filename}: " if err.filename else ""
        typer.secho(f"error: {where}{err.strerror or err}", fg=typer.colors.RED, err=True)
        sys.exit(2)
    except Terminated as err:
        # SIGTERM during an atomic write (the partial output is already removed) or a pipeline run (its task
        # processes stopped, its MLflow runs closed): what was cleaned up, and the exit status SIGTERM gives.
        typer.secho(f"terminated: {err}", fg=typer.colors.RED, err=True)
        sys.exit(128 + 15)
