"""Import checkpoints of the authors' reference implementation (Xiaoqi-Zhao-DLUT/MSNet-M2SNet).

Our M2SNet / MSNet use the reference's module names, so a reference state dict maps key for key
(key lists: docs ``official_m2snet_state_dict.tsv`` / ``official_msnet_state_dict.tsv``). Two
variations are accepted: a ``module.`` prefix (DataParallel) and the presence or absence of the
fixed all-ones filters ``conv_3.weight`` / ``conv_3.bias`` / ``conv_5.*`` (checked to hold ones /
zeros). Anything else that does not fit - an unknown key, a missing key, a wrong shape - is an
:class:`M2SNetError` listing the keys; nothing is skipped silently.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from m2snet.errors import M2SNetError
from m2snet.models.pretrained import read_state_dict, strip_prefixes, weights_from_checkpoint
from m2snet.models.units import SITE_BUFFERS

Checkpoint = str | os.PathLike | Mapping[str, torch.Tensor]
FIXED_FILTER_KEYS = ("conv_3.weight", "conv_3.bias", "conv_5.weight", "conv_5.bias")
REFERENCE_MODELS = ("m2snet", "msnet")


def _as_state_dict(ckpt: Checkpoint) -> tuple[dict[str, torch.Tensor], str]:
    if isinstance(ckpt, Mapping):
        state, where = dict(ckpt), "reference state dict"
        if "state_dict" in state and isinstance(state["state_dict"], Mapping):
            state = dict(state["state_dict"])
    else:
        state, where = read_state_dict(ckpt), str(ckpt)
    return strip_prefixes(state, ("module.",)), where


def _show(keys: list[str], limit: int = 12) -> str:
    return ", ".join(keys[:limit]) + (f" ... ({len(keys)} in all)" if len(keys) > limit else "")


def detect_reference_model(state: Mapping[str, torch.Tensor]) -> str:
    """``m2snet`` when the checkpoint has the MSU filters' BatchNorms, else ``msnet``."""
    return "m2snet" if any(k.startswith("conv_3.") for k in state) else "msnet"


def load_reference_checkpoint(model: nn.Module, ckpt: Checkpoint) -> nn.Module:
    """Load reference weights (a file or a state dict) into an M2SNet / MSNet built by us."""
    state, where = _as_state_dict(ckpt)
    return _load_state(model, state, where)


def _load_state(model: nn.Module, state: dict[str, torch.Tensor], where: str) -> nn.Module:
    own = model.state_dict()
    fixed = {k for k in FIXED_FILTER_KEYS if k in state}
    unexpected = sorted(set(state) - set(own) - (fixed if hasattr(model, "conv_3") else set()))
    # msu_norm="per_site": the per-site statistics start as copies of the shared ones (flagged)
    missing = sorted(k for k in set(own) - set(state) if k.rpartition(".")[2] not in SITE_BUFFERS)
    wrong = sorted(f"{k} {tuple(state[k].shape)} != {tuple(own[k].shape)}"
                   for k in set(state) & set(own) if state[k].shape != own[k].shape)
    problems = [f"{what} ({len(keys)}): {_show(keys)}" for what, keys in
                (("unknown keys", unexpected), ("missing keys", missing), ("wrong shapes", wrong)) if keys]
    if problems:
        name = type(model).__name__ + (f"(unit={model.unit!r})" if hasattr(model, "unit") else "")
        raise M2SNetError(f"{where}: does not fit {name}: " + "; ".join(problems))
    try:
        model.load_state_dict(state, strict=True)  # also checks the fixed filters' values
    except RuntimeError as err:
        raise M2SNetError(f"{where}: {err}") from err
    return model


def convert_reference(
    ckpt: Checkpoint,
    out: str | os.PathLike,
    model: str | None = None,
    image_size: int = 352,
) -> Path:
    """Convert a reference checkpoint into an m2snet checkpoint (the trainer's format, slim form)
    that evaluation, the registry and serving load. ``model``: ``m2snet`` / ``msnet`` (default:
    detected from the keys). ``n_classes`` comes from the checkpoint's ``output1`` head.
    M2SNet is converted as the reference has it, ``msu_norm="shared"``; ``m2snet recalibrate-bn``
    upgrades it to per-site statistics."""
    from m2snet import __version__
    from m2snet.hashing import sha256_file
    from m2snet.models import create_model
    from m2snet.models.checkpoint import Checkpoint as M2SNetCheckpoint
    from m2snet.runtime import git_commit

    state, where = _as_state_dict(ckpt)
    name = model or detect_reference_model(state)
    if name not in REFERENCE_MODELS:
        raise M2SNetError(f"--model must be one of {', '.join(REFERENCE_MODELS)}, got {name!r}")
    head = state.get("output1.0.weight")
    if head is None:
        raise M2SNetError(f"{where}: no output1.0.weight: not an M2SNet/MSNet reference checkpoint")
    n_classes = int(head.shape[0])
    config: dict[str, Any] = {"n_classes": n_classes, **({"msu_norm": "shared"} if name == "m2snet" else {})}
    with weights_from_checkpoint():  # the reference weights are loaded next
        net = create_model(name, pretrained=False, **config)
    _load_state(net, state, where)
    source: dict[str, Any] = {"reference": where}
    if not isinstance(ckpt, Mapping):
        source["reference_sha256"] = sha256_file(ckpt)
    return M2SNetCheckpoint(
        model_name=name,
        model_config=config,
        state_dict={k: v.detach().to("cpu") for k, v in net.state_dict().items()},
        n_classes=n_classes,
        image_size=image_size,
        normalization=net.normalization,
        epoch=0,
        pretrained_source=f"reference:{where}",
        converted_from=source,
        git_commit=git_commit(),
        m2snet_version=__version__,
    ).save(out)
