"""The registry of converters, timm-style: ``@register_importer("name")`` on an :class:`Importer`
subclass, ``list_importers()``, ``get_importer(name, **options)`` (options checked against the fields)."""

from __future__ import annotations

import types
from dataclasses import fields
from typing import Any, Callable, Union, get_args, get_origin, get_type_hints

from m2snet.data.importers.base import Importer
from m2snet.errors import M2SNetError

_IMPORTERS: dict[str, type[Importer]] = {}


def register_importer(name: str) -> Callable[[type[Importer]], type[Importer]]:
    def deco(cls: type[Importer]) -> type[Importer]:
        if name in _IMPORTERS:
            raise ValueError(f"importer {name!r} registered twice")
        cls.name = name
        _IMPORTERS[name] = cls
        return cls

    return deco


def list_importers() -> list[str]:
    return sorted(_IMPORTERS)


def importer_group_by(name: str) -> str | None:
    """The grouping importer ``name`` records (None for an unknown name)."""
    cls = _IMPORTERS.get(name)
    return cls.group_by if cls is not None else None


def get_importer(name: str, **options: Any) -> Importer:
    try:
        cls = _IMPORTERS[name]
    except KeyError:
        raise M2SNetError(f"unknown format {name!r}; known formats: {', '.join(list_importers())}") from None
    known = {f.name for f in fields(cls)}
    unknown = set(options) - known
    if unknown:
        raise M2SNetError(f"format {name!r} has no option(s) {sorted(unknown)}; it accepts {sorted(known)}")
    hints = get_type_hints(cls)
    return cls(**{key: _typed_option(name, key, value, hints[key]) for key, value in options.items()})


def _typed_option(fmt: str, key: str, value: Any, hint: Any) -> Any:
    """An importer option checked against its field's type (``-o threshold=abc`` is refused here, not
    as a numpy error deep in the import); a number given to a text option is taken as its text."""
    allowed = get_args(hint) if get_origin(hint) in (Union, types.UnionType) else (hint,)
    if value is None and type(None) in allowed:
        return value
    if str in allowed and isinstance(value, (str, int, float)) and not isinstance(value, bool):
        return str(value)
    if any(isinstance(value, t) and not (isinstance(value, bool) and t is not bool)
           for t in allowed if isinstance(t, type)):
        return value
    names = " or ".join("None" if t is type(None) else getattr(t, "__name__", str(t)) for t in allowed)
    raise M2SNetError(f"format {fmt!r}: option {key}={value!r} is not a valid {names}")
