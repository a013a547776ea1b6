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

Safe loading: the file holds tensors and plain data only (dict, list, tuple, str, int, float, bool,
None; :func:`plain` converts numpy scalars/arrays and paths when writing, and refuses anything else),
so it is read with ``torch.load(weights_only=True)``, which never imports or calls what a pickle
names. A file that needs more (a planted payload) is refused with one line naming it, never unpickled.
The one thing older m2snet wrote beyond plain data is numpy's RNG state in ``last.pt`` (its
``model.pt`` always was plain): :func:`upgrade_checkpoint` (``m2snet upgrade-checkpoint``) rewrites
such a file, letting the weights-only unpickler rebuild exactly those numpy types and nothing else.
"""

from __future__ import annotations

import dataclasses
import os
import pickle
import random
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from m2snet.errors import M2SNetError
from m2snet.files import atomic_file
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
        """The ``torch.save`` payload: tensors and plain data only (:func:`plain`; format_version first,
        None-valued optional fields left out)."""
        out: dict[str, Any] = {"format_version": FORMAT_VERSION}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name in ("resume", "extra", "path") or value is None:
                continue
            out[f.name] = value.to_dict() if isinstance(value, Normalization) else value
        if self.resume is not None:
            out.update(dataclasses.asdict(self.resume))
        out.update(self.extra)
        return {k: plain(v, k) for k, v in out.items()}

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
        """torch.save through :func:`m2snet.files.atomic_file`: a kill never leaves half a file, and
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
        payload = _load_weights_only(path, map_location)
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


# --- safe reading and writing -------------------------------------------------------------------
def _load_weights_only(path: Path, map_location: str | torch.device) -> Any:
    """``torch.load(weights_only=True)``: a pickle that names anything beyond tensors and plain data is
    refused before it is called, so a planted payload never runs."""
    try:
        with warnings.catch_warnings():  # protocol-4 pickles (a plain pickle.dump) warn before failing
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        if _names_globals(path, err):
            hint = (f" (an m2snet checkpoint from before weights-only loading: `m2snet upgrade-checkpoint {path} "
                    "--out NEW` rewrites it)" if _only_legacy_globals(path) else "")
            raise M2SNetError(f"{path} is not a safe m2snet checkpoint: it holds objects other than tensors and "
                              f"plain data; refusing to unpickle it{hint}") from None
        raise _unreadable(path, err) from err
    except Exception as err:
        raise _unreadable(path, err) from err


def _unreadable(path: Path, err: Exception) -> M2SNetError:
    """What a file torch could not read is, from its first bytes: torch's own error is an opcode ("101") or
    advice to retry with ``weights_only=False`` (which would run whatever the file holds), never passed on."""
    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError as read_err:
        return M2SNetError(f"{path}: cannot read it ({read_err.strerror or read_err})")
    if not head:
        what = "the file is empty"
    elif head.startswith(b"PK\x03\x04"):  # torch.save's format since 1.6, cut short or altered
        detail = _reason(err).removeprefix("PytorchStreamReader failed reading zip archive: ").split(". ")[0]
        what = f"a damaged torch.save zip archive ({detail}); copy or save it again"
    elif head[0] == 0x80:  # a pickle's PROTO opcode, without torch.save's legacy magic number
        what = (f"a Python pickle (protocol {head[1]}), not written by torch.save; m2snet reads checkpoints as "
                "tensors and plain data only and does not unpickle other files")
    else:
        what = f"neither a torch.save zip archive nor a pickle (it starts with {head!r})"
    return M2SNetError(f"{path}: not a readable torch checkpoint: {what}")


def _names_globals(path: Path, err: Exception) -> bool:
    """Whether the weights-only load failed on an object the pickle names (not on bytes that are no
    pickle at all): those are the files worth calling unsafe rather than unreadable."""
    reason = _reason(err).lower()  # torch's own line: "Unsupported global: GLOBAL io.open was not allowed..."
    if "global" in reason or "allowlist" in reason:
        return True
    try:
        return bool(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except Exception:  # noqa: BLE001 -- not a torch zip file: the bytes were the problem, not an object
        return False


def _only_legacy_globals(path: Path) -> bool:
    """Whether the file names nothing but the numpy types older m2snet wrote (:data:`LEGACY_NUMPY_GLOBALS`)."""
    try:
        names = set(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except Exception:  # noqa: BLE001 -- not a torch zip file
        return False
    return bool(names) and names <= {f"{g.__module__}.{g.__qualname__}" for g in LEGACY_NUMPY_GLOBALS}


# What m2snet wrote before checkpoints were plain data: numpy's legacy RNG state in last.pt, whose
# key is a uint32 array. upgrade_checkpoint lets the weights-only unpickler rebuild exactly these.
LEGACY_NUMPY_GLOBALS = (np._core.multiarray._reconstruct, np.ndarray, np.dtype, np.dtypes.UInt32DType)


def upgrade_checkpoint(src: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Rewrite an m2snet checkpoint written before checkpoints were plain data (numpy RNG state in
    ``last.pt``) as tensors and plain data; read weights-only with :data:`LEGACY_NUMPY_GLOBALS` allowed,
    so anything else in it is still refused, never unpickled."""
    src = Path(src)
    if not src.is_file():
        raise M2SNetError(f"{src}: checkpoint not found")
    with torch.serialization.safe_globals(list(LEGACY_NUMPY_GLOBALS)):
        payload = _load_weights_only(src, "cpu")
    if not isinstance(payload, dict):
        raise M2SNetError(f"{src}: not an m2snet checkpoint (a {type(payload).__name__}, not a dict)")
    rng = payload.get("rng")
    if isinstance(rng, dict) and isinstance(rng.get("numpy"), tuple):  # np.random.get_state()'s legacy tuple
        rng["numpy"] = _numpy_rng_state(*rng["numpy"])
    return Checkpoint.from_dict(payload, src).save(out)


def _reason(err: Exception) -> str:
    """One line out of torch's multi-paragraph weights-only message (or any other error)."""
    text = str(err)
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1]
    # Never torch's advice to load with weights_only=False: it runs whatever the file holds.
    lines = [line.strip() for line in text.splitlines() if line.strip() and "weights_only" not in line]
    return lines[0] if lines else type(err).__name__


def plain(value: Any, key: str = "checkpoint") -> Any:
    """``value`` as tensors and plain data, what ``torch.load(weights_only=True)`` reads back.

    numpy scalars and arrays become Python numbers and lists, paths strings; containers are converted
    member by member (tuples stay tuples). Anything else is a TypeError naming ``key``: a checkpoint
    that could only be read by unpickling arbitrary objects is never written.
    """
    if value is None or isinstance(value, (bool, int, float, str, torch.Tensor, torch.dtype, torch.Size)):
        return value
    if isinstance(value, (np.generic, np.ndarray)):
        return value.tolist()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, dict):
        return {plain(k, key): plain(v, f"{key}.{k}") for k, v in value.items()}
    if type(value) in (list, tuple):
        return type(value)(plain(v, f"{key}[{i}]") for i, v in enumerate(value))
    raise TypeError(f"checkpoint field {key!r}: a {type(value).__module__}.{type(value).__qualname__} object is "
                    "not a tensor or plain data (a checkpoint is read with torch.load(weights_only=True))")


# --- RNG state -------------------------------------------------------------------------------
def capture_rng_state() -> dict[str, Any]:
    """Every generator's state as tensors and plain data (numpy's MT19937 key as an int64 tensor)."""
    return {
        "python": random.getstate(),  # (version, tuple of ints, gauss): plain
        "numpy": _numpy_rng_state(*np.random.get_state()),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def _numpy_rng_state(bit_generator: str, key: np.ndarray, pos: int, has_gauss: int, gauss: float) -> dict[str, Any]:
    """np.random.get_state()'s tuple as plain data (the uint32 key as an int64 tensor)."""
    return {"bit_generator": str(bit_generator), "key": torch.from_numpy(np.asarray(key).astype(np.int64)),
            "pos": int(pos), "has_gauss": int(has_gauss), "gauss": float(gauss)}


def restore_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np_state = state["numpy"]
    np.random.set_state((np_state["bit_generator"], np_state["key"].numpy().astype(np.uint32), np_state["pos"],
                         np_state["has_gauss"], np_state["gauss"]))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
