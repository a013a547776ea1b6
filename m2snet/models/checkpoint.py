"""The checkpoint format, written atomically every epoch, and loading a model back from it.

Format (a ``torch.save`` dict; ``format_version`` 1):

    format_version   1
    model_name       registry name for m2snet.models.create_model ("m2snet", "unet", ...)
    model_config     the kwargs create_model was called with (n_classes included, pretrained
                     dropped: weights come from ``state_dict``)
    state_dict       model weights (float32, on CPU)
    n_classes        1 = binary (sigmoid), >1 = class ids (softmax)
    image_size       the square input size the model was trained/validated at
    normalization    {"mean": [r, g, b], "std": [r, g, b]} on 0..255 RGB
    train_config     TrainConfig.to_dict() of the run
    epoch            epochs completed (1-based count)
    metrics          validation metrics of that epoch ({} without validation)
    selection        the rule that chose this checkpoint (TrainConfig.selection: final / inner / fold_best)
    selected_epoch   (model.pt only) the epoch the rule chose
    pretrained_source  where the initial weights came from (None = random init)
    dataset_version, split_sha256, git_commit, m2snet_version   provenance
    -- only in the "full" (resumable) checkpoint ``last.pt``:
    optimizer, scheduler, scaler   their state_dicts
    rng              {"python", "numpy", "torch", "cuda"} generator states
    history          list of per-epoch dicts (loss, lr, val metrics, seconds)
    selected         {"epoch", "score"} of the checkpoint selected so far

``model.pt`` is the slim form (no optimizer/RNG state): what evaluation, the pyfunc model,
the registry and serving load via :func:`load_model_from_checkpoint`.
"""

from __future__ import annotations

import contextlib
import os
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from m2snet.common import M2SNetError
from m2snet.data.dataset import MEAN, STD

FORMAT_VERSION = 1
# Input normalisation the data pipeline applies (reference recipe, on 0..255 RGB).
DEFAULT_NORMALIZATION = {"mean": list(MEAN), "std": list(STD)}
RESUME_KEYS = ("optimizer", "scheduler", "scaler", "rng", "history", "selected")


def save_checkpoint(path: str | os.PathLike, payload: dict[str, Any]) -> Path:
    """torch.save to a temp file beside ``path`` then rename: a kill never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        torch.save({"format_version": FORMAT_VERSION, **payload}, tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def slim(payload: dict[str, Any]) -> dict[str, Any]:
    """The inference form of a full checkpoint (drops optimizer / RNG / history)."""
    return {k: v for k, v in payload.items() if k not in RESUME_KEYS}


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise M2SNetError(f"{path}: checkpoint not found")
    try:
        # Our checkpoints hold plain python/numpy objects (RNG states, configs): not weights-only.
        ckpt = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as err:  # noqa: BLE001 - corrupt / foreign file
        raise M2SNetError(f"{path}: not a readable torch checkpoint ({err})") from err
    if not isinstance(ckpt, dict) or "format_version" not in ckpt or "state_dict" not in ckpt:
        raise M2SNetError(
            f"{path}: not an m2snet checkpoint (no format_version/state_dict; for the authors' "
            "reference weights use m2snet.models.reference.convert_reference first)"
        )
    if ckpt["format_version"] > FORMAT_VERSION:
        raise M2SNetError(
            f"{path}: checkpoint format_version {ckpt['format_version']} is newer than this m2snet "
            f"understands ({FORMAT_VERSION}); upgrade m2snet"
        )
    return ckpt


def build_model(meta: dict[str, Any]) -> torch.nn.Module:
    """Instantiate the checkpoint's architecture with random init (weights are loaded after)."""
    from m2snet.models import create_model
    from m2snet.models.pretrained import weights_from_checkpoint

    cfg = dict(meta.get("model_config") or {})
    cfg["pretrained"] = False
    cfg.setdefault("n_classes", meta.get("n_classes", 1))
    if "conv_3.site_running_mean" in (meta.get("state_dict") or {}):
        cfg.setdefault("msu_norm", "per_site")  # M2SNet trained with per-site filter statistics
    # LossNet-style pretrained knobs of the model (if any) must not trigger downloads either; the
    # checkpoint's weights follow, so no "random weights" warning.
    with weights_from_checkpoint():
        return create_model(meta["model_name"], **cfg)


def load_model_from_checkpoint(
    path: str | os.PathLike, device: str | torch.device = "cpu"
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Load a checkpoint written by the trainer: (model in eval mode on ``device``, metadata).

    ``meta`` is the checkpoint without ``state_dict`` and resume state; it holds ``image_size``,
    ``normalization``, ``n_classes``, ``model_name``, ``train_config``, ``metrics``, ...
    """
    ckpt = load_checkpoint(path)
    model = build_model(ckpt)
    try:
        model.load_state_dict(ckpt["state_dict"], strict=True)
    except RuntimeError as err:
        raise M2SNetError(f"{path}: weights do not fit model {ckpt['model_name']!r}: {err}") from err
    model.to(device).eval()
    meta = {k: v for k, v in slim(ckpt).items() if k != "state_dict"}
    meta.setdefault("normalization", DEFAULT_NORMALIZATION)
    meta["path"] = str(path)
    return model, meta


# --- RNG state -------------------------------------------------------------------------------
def capture_rng_state() -> dict[str, Any]:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
