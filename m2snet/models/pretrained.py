"""Pretrained ImageNet weights: from the Hugging Face hub (through timm's hub ids), from the local
hub cache, or from a local file; otherwise random weights and a logged warning.

One loader for every network that wants ImageNet weights (the Res2Net encoder, the smp encoders,
the LossNet VGG-16), so offline behaviour is the same everywhere:

- ``pretrained=False``: random weights, a warning, source ``None``; no warning
  inside :func:`weights_from_checkpoint`, where the weights are loaded right after.
- ``pretrained="<path>"``: a local ``.safetensors`` / ``.pth`` file; a wrong file is an
  :class:`M2SNetError` (never a silent fallback, the user asked for that file).
- ``pretrained=True``: the hub. With ``HF_HUB_OFFLINE=1`` or ``M2SNET_OFFLINE=1`` the network is
  never touched: only the local hub cache is looked at. Otherwise a short TCP probe of the hub
  host runs first, so that a machine without network fails in about a second rather than after
  huggingface_hub's retries and long timeouts.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
import socket
from pathlib import Path
from typing import Callable, Mapping
from urllib.parse import urlparse

import torch
from torch import nn

from m2snet import progress
from m2snet.errors import M2SNetError

log = logging.getLogger("m2snet.models")

# Seconds to wait for the hub host before giving up on pretrained weights.
HUB_PROBE_TIMEOUT = float(os.environ.get("M2SNET_HUB_TIMEOUT", "3"))
_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")

StateDict = Mapping[str, torch.Tensor]
KeyFilter = Callable[[StateDict], dict[str, torch.Tensor]]

# True while a network is built only to receive a checkpoint's weights: "random weights" is untrue then.
_WEIGHTS_FOLLOW: contextvars.ContextVar[bool] = contextvars.ContextVar("m2snet_weights_follow", default=False)


@contextlib.contextmanager
def weights_from_checkpoint():
    """Build models whose weights are loaded next (a checkpoint, a reference file): no random-init warning."""
    token = _WEIGHTS_FOLLOW.set(True)
    try:
        yield
    finally:
        _WEIGHTS_FOLLOW.reset(token)


def _warn_random_init(message: str) -> None:
    if not _WEIGHTS_FOLLOW.get():
        log.warning(message)
        progress.emit("note", message=message)  # the local console shows it once


def offline() -> bool:
    """True when the user asked for no network access at all."""
    truthy = {"1", "true", "yes", "on"}
    return (os.environ.get("M2SNET_OFFLINE", "").lower() in truthy
            or os.environ.get("HF_HUB_OFFLINE", "").lower() in truthy)


def hub_reachable(timeout: float = HUB_PROBE_TIMEOUT) -> bool:
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    url = urlparse(endpoint)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a weights file (safetensors or a torch pickle, optionally wrapped in a dict under
    ``state_dict`` / ``model`` / ``net``)."""
    path = Path(path)
    if not path.is_file():
        raise M2SNetError(f"{path}: weights file not found")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj = load_file(str(path))
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # any reader failure is a bad user file, re-raised as M2SNetError
        raise M2SNetError(f"{path}: cannot read weights ({type(err).__name__}: {err})") from err
    for key in ("state_dict", "model", "net", "model_state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise M2SNetError(f"{path}: not a state dict (expected a mapping of tensor names to tensors)")
    return dict(obj)


def strip_prefixes(state: StateDict, prefixes: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """Remove any of ``prefixes`` (applied repeatedly, e.g. ``module.resnet.``) from every key."""
    out = {}
    for key, value in state.items():
        changed = True
        while changed:
            changed = False
            for p in prefixes:
                if key.startswith(p):
                    key, changed = key[len(p):], True
        out[key] = value
    return out


def _hub_file(repo_id: str, allow_network: bool) -> tuple[str, str] | None:
    """(local path, how it was found) for the hub weights of ``repo_id``, or None."""
    import huggingface_hub

    # huggingface_hub reads HF_HUB_CACHE once at import; read it here so a later change counts.
    cache_dir = os.environ.get("HF_HUB_CACHE") or None
    for filename in _WEIGHT_FILES:
        cached = huggingface_hub.try_to_load_from_cache(repo_id, filename, cache_dir=cache_dir)
        if isinstance(cached, str):
            return cached, f"hf-cache:{repo_id}"
    if not allow_network:
        return None
    for filename in _WEIGHT_FILES:
        try:
            path = huggingface_hub.hf_hub_download(repo_id, filename, cache_dir=cache_dir)
            return path, f"hub:{repo_id}"
        except Exception as err:  # noqa: BLE001 - e.g. 404 for the other file name
            last = err
    log.warning("pretrained weights %s: hub download failed (%s)", repo_id, last)
    return None


def load_pretrained(
    module: nn.Module,
    pretrained: bool | str | os.PathLike,
    *,
    hub_id: str,
    what: str,
    key_filter: KeyFilter | None = None,
    ignore_missing: tuple[str, ...] = (),
) -> str | None:
    """Load ImageNet weights into ``module``; return where they came from, or None (random).

    ``key_filter`` maps the file's keys to ``module``'s (e.g. strips ``resnet.``). Keys of the
    module starting with one of ``ignore_missing`` may be absent (e.g. a classifier head).
    """
    if pretrained is False or pretrained is None:
        _warn_random_init(f"{what}: pretrained=False, using random weights")
        return None
    if pretrained is True:
        # The local hub cache first (no network), then the hub itself unless offline / unreachable.
        found = _hub_file(hub_id, allow_network=False)
        if found is not None:
            reason = ""
        elif offline():
            reason = "offline (HF_HUB_OFFLINE / M2SNET_OFFLINE) and not in the local hub cache"
        elif not hub_reachable():
            reason = f"hub not reachable within {HUB_PROBE_TIMEOUT:g}s and not in the local hub cache"
        else:
            found = _hub_file(hub_id, allow_network=True)
            reason = "hub download failed"
        if found is None:
            _warn_random_init(f"{what}: no pretrained weights ({reason}); using RANDOM weights. Pass a local "
                              "weights file to use ImageNet weights.")
            return None
        path, source = found
    else:
        path, source = Path(pretrained), f"file:{Path(pretrained).resolve()}"
    state = read_state_dict(path)
    if key_filter is not None:
        state = key_filter(state)
    own = module.state_dict()
    unexpected = sorted(set(state) - set(own))
    missing = sorted(k for k in set(own) - set(state) if not k.startswith(ignore_missing))
    wrong = sorted(k for k in set(state) & set(own) if tuple(state[k].shape) != tuple(own[k].shape))
    if unexpected or missing or wrong:
        def show(keys: list[str]) -> str:
            return ", ".join(keys[:8]) + (f" ... ({len(keys)} in all)" if len(keys) > 8 else "")
        problems = [f"{name}: {show(keys)}" for name, keys in
                    (("unexpected keys", unexpected), ("missing keys", missing),
                     ("wrong shapes", wrong)) if keys]
        raise M2SNetError(f"{path}: weights do not fit {what}; " + "; ".join(problems))
    module.load_state_dict(state, strict=False)
    log.info("%s: pretrained weights from %s", what, source)
    return source
