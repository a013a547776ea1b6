"""`m2snet services up`: SeaweedFS S3 + an MLflow server on loopback, in the foreground."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

app = typer.Typer(help="Local services: SeaweedFS (S3) and an MLflow tracking server.", no_args_is_help=True)


@app.command("up")
def up(
    dir: Path = typer.Option(Path(".m2snet/services"), "--dir", help="Where the services keep data and logs."),
    s3_port: Optional[int] = typer.Option(None, help="S3 port (default: a free port)."),
    mlflow_port: Optional[int] = typer.Option(None, help="MLflow port (default: a free port)."),
    bucket: str = typer.Option("m2snet", help="S3 bucket for DVC and MLflow artifacts."),
) -> None:
    """Start SeaweedFS S3 and `mlflow server` (SQLite, artifacts on S3); print env exports; Ctrl-C stops both."""
    from m2snet.mlops.services import run_services

    run_services(dir, s3_port=s3_port, mlflow_port=mlflow_port, bucket=bucket, echo=typer.echo)
