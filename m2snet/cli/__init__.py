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
import traceback

import typer

from m2snet.cli import benchmark, compare, data, models, pipeline, predict, registry, serve, services, train, tune
from m2snet.errors import M2SNetError
from m2snet.redaction import install_redaction, redact
from m2snet.signals import Terminated

app = typer.Typer(
    name="m2snet",
    help="Train, tune, compare, track, register and serve M2SNet segmentation models.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


def version_line() -> str:
    """``m2snet <version>``, with the commit when the package runs from a git checkout (``, modified``
    when it has uncommitted changes)."""
    from m2snet import __version__
    from m2snet.runtime import git_commit

    commit = git_commit()
    if commit.startswith("m2snet-"):  # not a checkout: git_commit fell back to the package version
        return f"m2snet {__version__}"
    sha, dirty = commit.removesuffix("+dirty"), commit.endswith("+dirty")
    return f"m2snet {__version__} (git {sha[:12]}{', modified' if dirty else ''})"


def _print_version(value: bool) -> None:
    if value:
        typer.echo(version_line())
        raise typer.Exit()


@app.callback()
def _root(
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Debug logging."),
    version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                 help="Print the version (and the git commit of a checkout) and exit."),
) -> None:
    install_redaction()  # before any library logs: no credential reaches the console or a log file
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
for area in (models, train, tune, compare, registry, predict, serve, benchmark):
    app.add_typer(area.app)


def main() -> None:
    """Entry point: user errors print one clear line and exit 2, never a traceback."""
    try:
        app()
    except M2SNetError as err:
        # Masked: an error may quote a URI the user gave (MLFLOW_TRACKING_URI with its password).
        typer.secho(f"error: {redact(str(err))}", fg=typer.colors.RED, err=True)
        sys.exit(2)
    except OSError as err:
        # A path the user gave could not be read or written (permissions, /proc, a full disk, a file where
        # a folder is needed): the same one line; --verbose logs the traceback for a real bug.
        logging.getLogger("m2snet.cli").debug("traceback of the error below", exc_info=True)
        where = f"{err.filename}: " if err.filename else ""
        typer.secho(f"error: {redact(where + str(err.strerror or err))}", fg=typer.colors.RED, err=True)
        sys.exit(2)
    except Terminated as err:
        # SIGTERM during an atomic write (the partial output is already removed) or a pipeline run (its task
        # processes stopped, its MLflow runs closed): what was cleaned up, and the exit status SIGTERM gives.
        typer.secho(f"terminated: {err}", fg=typer.colors.RED, err=True)
        sys.exit(128 + 15)
    except Exception:  # noqa: BLE001 -- printed (masked) and exit 1, as an uncaught one would
        # A bug (or a library error we do not translate yet): the traceback is for the developer, but it
        # quotes what the failing call was given (a tracking URI with its password), so it is masked too.
        sys.stderr.write(redact(traceback.format_exc()))
        sys.exit(1)
