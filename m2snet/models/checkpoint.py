"""The checkpoint: one typed object (:class:`Checkpoint`), written and read only here.

On disk (a ``torch.save`` dict; ``format_version`` 1, unchanged by the typed object):

    format_version   1
    model_name       registry name for m2snet.models.create_model ("m2snet", "unet", ...)
    model_config     the kwargs create_model was called with (n_classes included, pretrained
                     dropped: weights come from ``state_dict``)
    state_dict       model weights (float32, on CPU)
    n_classes        1 = binary (sigmoid), >1 = class ids (softmax)
    image_size       the square input size the model was trained/validated at
    normalization    {"mean": [r, g, b], "std": [r, g, b]} on 0..255 RGB (models.preprocessing)
    train_config     TrainConfig.to_dict() of the run (absent from a converted reference checkpoint)
    epoch            epochs completed (1-based count)
    metrics          validation metrics of that epoch ({} without validation)
    selection        the rule that chose this checkpoint (TrainConfig.selection: final / inner / fold_best)
    selected_epoch   (model.pt only) the epoch the rule chose
    pretrained_source  where the initial weights came from (None = random init)
    dataset_version, split_sha256, fold, mask_classes, git_commit, m2snet_version   provenance
    converted_from   (convert-reference) the reference file and its sha256
    bn_recalibration (recalibrated checkpoints) what the BatchNorm statistics were estimated on
    -- only in the "full" (resumable) checkpoint ``last.pt`` (:class:`ResumeState`):
    optimizer, scheduler, scaler   their state_dicts
    rng              {"python", "numpy", "torch", "cuda"} generator states
    history          list of per-epoch dicts (loss, lr, val metrics, seconds)
    selected         {"epoch", "score"} of the checkpoint selected so far

Optional fields that are None are not written; keys this version does not know are kept in
``Checkpoint.extra`` and written back. ``model.pt`` is the slim form (no resume state): what
evaluation, the pyfunc model, the registry and serving load via
``Checkpoint.load(path).build_model(device=...)``.
"""

from __future__ import annotations

import dataclasses
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from m2snet.common import M2SNetError, atomic_file
from m2snet.models.preprocessing import DEFAULT_NORMALIZATION, Normalization

FORMAT_VERSION = 1
REQUIRED_KEYS = ("format_version", "model_name", "state_dict")


@dataclass
class ResumeState:
    """What ``last.pt`` holds beyond the weights to continue a run exactly."""

    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    scaler: dict[str, Any]
    rng: dict[str, Any]
    history: list[dict[str, float]]
    selected: dict[str, float]  # {"epoch", "score"} of the checkpoint selected so far


RESUME_KEYS = tuple(f.name for f in dataclasses.fields(ResumeState))


@dataclass
class Checkpoint:
    """A model's weights with everything needed to rebuild, feed and trace it (see the module docstring)."""

    model_name: str
    state_dict: dict[str, torch.Tensor] = field(repr=False)
    model_config: dict[str, Any] = field(default_factory=dict)
    n_classes: int = 1
    image_size: int = 352
    normalization: Normalization = DEFAULT_NORMALIZATION
    train_config: dict[str, Any] | None = None
    epoch: int = 0
    metrics: dict[str, float] = field(default_factory=dict)
    selection: str | None = None
    selected_epoch: int | None = None
    pretrained_source: str | None = None
    dataset_version: str | None = None
    split_sha256: str | None = None
    fold: int | None = None
    mask_classes: list[Any] | None = None
    git_commit: str | None = None
    m2snet_version: str | None = None
    converted_from: dict[str, Any] | None = None
    bn_recalibration: dict[str, Any] | None = None
    resume: ResumeState | None = field(default=None, repr=False)
    extra: dict[str, Any] = field(default_factory=dict, repr=False)  # keys of a newer writer, kept as they are
    path: Path | None = field(default=None, compare=False)  # the file it was loaded from (not written)

    # --- the on-disk dict -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The ``torch.save`` payload (format_version first; None-valued optional fields left out)."""
        out: dict[str, Any] = {"format_version": FORMAT_VERSION}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name in ("resume", "extra", "path") or value is None:
                continue
            out[f.name] = value.to_dict() if isinstance(value, Normalization) else value
        if self.resume is not None:
            out.update(dataclasses.asdict(self.resume))
        out.update(self.extra)
        return out

    @classmethod
    def from_dict(cls, payload: dict[str, Any], path: str | os.PathLike | None = None) -> Checkpoint:
        where = path or "checkpoint"
        missing = [k for k in REQUIRED_KEYS if k not in payload]
        if missing:
            raise M2SNetError(
                f"{where}: not an m2snet checkpoint (no {'/'.join(missing)}; for the authors' "
                "reference weights use m2snet.models.reference.convert_reference first)"
            )
        if payload["format_version"] > FORMAT_VERSION:
            raise M2SNetError(
                f"{where}: checkpoint format_version {payload['format_version']} is newer than this m2snet "
                f"understands ({FORMAT_VERSION}); upgrade m2snet"
            )
        names = {f.name for f in dataclasses.fields(cls)} - {"resume", "extra", "path"}
        kwargs = {k: v for k, v in payload.items() if k in names}
        kwargs["normalization"] = Normalization.from_dict(payload.get("normalization"))
        kwargs["model_config"] = dict(payload.get("model_config") or {})
        kwargs["metrics"] = dict(payload.get("metrics") or {})
        if all(k in payload for k in RESUME_KEYS):
            kwargs["resume"] = ResumeState(**{k: payload[k] for k in RESUME_KEYS})
        extra = {k: v for k, v in payload.items() if k not in names and k not in RESUME_KEYS and k != "format_version"}
        return cls(**kwargs, extra=extra, path=Path(path) if path is not None else None)

    # --- files ------------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> Path:
        """torch.save through :func:`m2snet.common.atomic_file`: a kill never leaves half a file, and
        the file gets the umask's mode (readable by the serving container, other users)."""
        path = Path(path)
        with atomic_file(path) as tmp:
            torch.save(self.to_dict(), tmp)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, map_location: str | torch.device = "cpu") -> Checkpoint:
        """Read a checkpoint file; a missing, unreadable or foreign file is an error naming it."""
        path = Path(path)
        if not path.is_file():
            raise M2SNetError(f"{path}: checkpoint not found")
        try:
            # Our checkpoints hold plain python/numpy objects (RNG states, configs): not weights-only.
            payload = torch.load(path, map_location=map_location, weights_only=False)
        except Exception as err:
            raise M2SNetError(f"{path}: not a readable torch checkpoint ({err})") from err
        if not isinstance(payload, dict):
            raise M2SNetError(f"{path}: not an m2snet checkpoint (a {type(payload).__name__}, not a dict; for the "
                              "authors' reference weights use m2snet.models.reference.convert_reference first)")
        return cls.from_dict(payload, path)

    # --- forms ------------------------------------------------------------------------------------
    @property
    def resumable(self) -> bool:
        """Holds optimizer / scheduler / scaler / RNG state (the trainer's ``last.pt``)."""
        return self.resume is not None

    def slim(self) -> Checkpoint:
        """The inference form: the same checkpoint without resume state."""
        return dataclasses.replace(self, resume=None)

    def meta(self) -> dict[str, Any]:
        """Everything but weights and resume state, as a plain dict (the Predictor's / ONNX metadata)."""
        meta = {k: v for k, v in self.slim().to_dict().items() if k != "state_dict"}
        if self.path is not None:
            meta["path"] = str(self.path)
        return meta

    # --- the model --------------------------------------------------------------------------------
    def architecture(self) -> torch.nn.Module:
        """The checkpoint's architecture with random init (no weights loaded, no downloads)."""
        from m2snet.models import create_model
        from m2snet.models.pretrained import weights_from_checkpoint

        cfg = dict(self.model_config)
        cfg["pretrained"] = False
        cfg.setdefault("n_classes", self.n_classes)
        if "conv_3.site_running_mean" in self.state_dict:
            cfg.setdefault("msu_norm", "per_site")  # M2SNet trained with per-site filter statistics
        # LossNet-style pretrained knobs of the model (if any) must not trigger downloads either; the
        # checkpoint's weights follow, so no "random weights" warning.
        with weights_from_checkpoint():
            return create_model(self.model_name, **cfg)

    def build_model(self, device: str | torch.device = "cpu") -> torch.nn.Module:
        """The model with the checkpoint's weights, in eval mode on ``device``."""
        model = self.architecture()
        try:
            model.load_state_dict(self.state_dict, strict=True)
        except RuntimeError as err:
            raise M2SNetError(
                f"{self.path or 'checkpoint'}: weights do not fit model {self.model_name!r}: {err}") from err
        model.normalization = self.normalization
        return model.to(device).eval()


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
