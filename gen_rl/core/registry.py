"""Name -> class registries with ``package.module:Class`` dotted paths for user code."""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Mapping


def resolve(registry: Mapping[str, type], name: str, kind: str) -> type:
    """Return ``registry[name]`` or import ``package.module:Class``; unknown names list the known ones."""
    if name in registry:
        return registry[name]
    if ":" in name:
        module_name, _, attribute = name.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError as error:
            raise ValueError(f"cannot import {kind} {name!r}: {error}") from error
        if not hasattr(module, attribute):
            raise ValueError(f"cannot import {kind} {name!r}: module {module_name!r} has no {attribute!r}")
        return getattr(module, attribute)
    close = difflib.get_close_matches(name, list(registry), n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise ValueError(
        f"unknown {kind} {name!r}.{hint} Known: {', '.join(sorted(registry))}; "
        f"or give a dotted path 'package.module:Class' to your own."
    )
