"""The model registry: architectures register a factory under a name; ``create_model`` builds one.

The package (``m2snet.models``) imports ``zoo`` so that every model is registered before anyone can
ask for one; import the names from ``m2snet.models``.
"""

from __future__ import annotations

from typing import Any, Callable

from torch import nn

from m2snet.errors import M2SNetError

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register_architecture(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
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
