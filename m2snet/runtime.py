"""What a run records and runs on: the code version, seeds, the compute device.

Torch and numpy are imported inside the functions that need them: the CLI imports this module at start-up.
"""

from __future__ import annotations

import os
import random
import subprocess
from pathlib import Path

from m2snet import __version__
from m2snet.errors import M2SNetError


def git_commit(cwd: str | os.PathLike | None = None) -> str:
    """The code version: the git commit (with '+dirty' for local changes), else the package version."""
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd or Path(__file__).parent,
            capture_output=True, text=True, check=True, timeout=10,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd or Path(__file__).parent,
            capture_output=True, text=True, check=True, timeout=10,
        ).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return f"m2snet-{__version__}"


def seed_everything(seed: int, deterministic: bool = False) -> None:
    """Seed python, numpy and torch; optionally ask torch for deterministic kernels."""
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


def resolve_device(device: str = "auto") -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise M2SNetError(f"device {device!r} requested but CUDA is not available on this machine")
    return device
