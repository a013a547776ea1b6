"""The model registry: ``create_model(name, **config)`` and ``list_models()``.

Names: m2snet, msnet, m2snet_au, m2snet_aspp, m2snet_denseaspp, fpn, unet, unetplusplus.
Common config: ``n_classes=1``, ``pretrained=True`` (hub when reachable; a path = local file;
False = random), ``msu_impl="fast" | "dense"`` and ``msu_norm="per_site" | "shared"`` (m2snet only). Every model has
``pretrained_source``, ``backbone_parameters()`` and ``head_parameters()``.
"""

from __future__ import annotations

from typing import Any, Callable

from torch import nn

from m2snet.common import M2SNetError

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register_model(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    def decorate(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} registered twice")
        _REGISTRY[name] = fn
        return fn
    return decorate


def list_models() -> list[str]:
    return list(_REGISTRY)


def create_model(name: str, **config: Any) -> nn.Module:
    """Build a registered model. Unknown names or options raise :class:`M2SNetError`."""
    try:
        factory = _REGISTRY[name]
    except KeyError:
        raise M2SNetError(f"unknown model {name!r}; available: {', '.join(list_models())}") from None
    try:
        return factory(**config)
    except TypeError as err:
        raise M2SNetError(f"model {name!r}: bad configuration {sorted(config)}: {err}") from err


# Importing the modules below registers the models.
from m2snet.models import zoo as _zoo  # noqa: E402,F401
