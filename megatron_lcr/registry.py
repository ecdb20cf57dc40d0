"""Name lookup in a registry: a dict from a config value (``"gspo"``, ``"k3"``) to what it selects.

Variants are registries, not ``if name == ...`` chains (DESIGN.md, style 3); this is the one place
that turns a bad name into the error every config reports: ``unknown <what> <name>; valid: <names>``.
"""

from __future__ import annotations

from typing import Mapping, TypeVar

_V = TypeVar("_V")


def lookup(registry: Mapping[str, _V], name: str, what: str) -> _V:
    """``registry[name]``, or a ValueError that names ``what``, the bad name and the valid ones."""
    try:
        return registry[name]
    except KeyError:
        valid = ", ".join(repr(k) for k in registry)
        raise ValueError(f"unknown {what} {name!r}; valid: {valid}") from None
