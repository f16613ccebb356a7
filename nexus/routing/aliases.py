"""Model aliases: ``alias -> target``, followed for at most three hops (no cycles)."""

from __future__ import annotations

from collections.abc import Mapping

from ..config import MAX_ALIAS_HOPS


def resolve(model: str, aliases: Mapping[str, str]) -> str:
    """The model an alias finally names; a name that is no alias is returned unchanged."""
    current = model
    for _ in range(MAX_ALIAS_HOPS):
        target = aliases.get(current)
        if target is None:
            break
        current = target
    return current


def alias_chain(model: str, aliases: Mapping[str, str]) -> list[str]:
    """Every name a request goes by: the one asked for, each alias hop, the model it resolves to."""
    names = [model]
    for _ in range(MAX_ALIAS_HOPS):
        target = aliases.get(names[-1])
        if target is None:
            break
        names.append(target)
    return names
