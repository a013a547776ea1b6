"""CLI commands for this area. Registered on the root app by m2snet.cli."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Add this area's commands (or sub-app) to the root `m2snet` app."""
