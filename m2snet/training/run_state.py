"""A run's state on disk: the run directory against ``--resume``, whether ``last.pt`` may be resumed with
this config, and what every checkpoint of the run records beside its weights."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from m2snet import __version__
from m2snet.errors import M2SNetError
from m2snet.models.checkpoint import Checkpoint
from m2snet.runtime import git_commit
from m2snet.training.cases import FoldCases
from m2snet.training.config import LAST, TrainConfig


def open_run_dir(out: Path, resume: bool) -> Checkpoint | None:
    """Check the run directory against ``resume``; the checkpoint to resume from, if any."""
    last_path = out / LAST
    if resume and not last_path.is_file():
        raise M2SNetError(f"{last_path}: nothing to resume (no checkpoint); start without --resume")
    if not resume and last_path.exists():
        raise M2SNetError(f"{out}: already holds a run ({LAST}); use --resume to continue it or another --out")
    # Read (safely) before building data and model: a foreign or unsafe last.pt fails in a second.
    resumed = Checkpoint.load(last_path) if resume else None
    out.mkdir(parents=True, exist_ok=True)
    return resumed


def _resolved(path: Any) -> Any:
    return str(Path(path).resolve()) if isinstance(path, str) and path else path


def check_resumable(ckpt: Checkpoint, cfg: TrainConfig, last_path: Path) -> None:
    """Refuse a slim checkpoint, or one written with another config than ``cfg``."""
    if not ckpt.resumable:
        raise M2SNetError(f"{last_path}: a slim checkpoint (no optimizer/RNG state); it cannot be resumed")
    config, saved = cfg.to_dict(), dict(ckpt.train_config or {})
    defaults = TrainConfig().to_dict()
    for key in config.keys() - saved.keys():  # a field added since the checkpoint was written: it ran with
        saved[key] = defaults.get(key)  # that field's default
    for key in ("data", "split"):  # one file named two ways (relative, absolute) is the same input
        config[key], saved[key] = (_resolved(config.get(key)), _resolved(saved.get(key)))
    diff = sorted(k for k in config.keys() | saved.keys() if config.get(k) != saved.get(k))
    if diff:
        raise M2SNetError(f"{last_path}: config differs from the checkpoint's in {diff}; resume with the same config")


def checkpoint_meta(cfg: TrainConfig, cases: FoldCases, model: torch.nn.Module,
                    model_config: dict[str, Any]) -> dict[str, Any]:
    """What every checkpoint of the run records beside its weights, epoch and metrics."""
    return {"model_name": cfg.model, "model_config": model_config, "n_classes": cases.info.n_classes,
            "image_size": cfg.size, "normalization": model.normalization, "train_config": cfg.to_dict(),
            "pretrained_source": getattr(model, "pretrained_source", None), "dataset_version": cases.info.version,
            "split_sha256": cases.split_sha256, "fold": cfg.fold if cfg.split else None,
            "git_commit": git_commit(), "m2snet_version": __version__, "selection": cfg.selection,
            "mask_classes": getattr(cases.info, "mask_classes", None)}
