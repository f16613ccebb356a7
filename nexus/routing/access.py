"""What a client key lets a request reach: which models (aliases resolved first), and whether
open-zone backends are allowed at all. The planner asks; the key set (``keys/``) answers."""

from __future__ import annotations

from typing import Protocol

from ..errors import Forbidden


class Access(Protocol):
    name: str
    restricted: bool  # max_zone = "restricted": never an open-zone backend, failover included

    def allows(self, model: str) -> bool: ...

    def allowed(self) -> list[str]: ...


class ModelNotAllowed(Forbidden):
    code = "model_not_allowed"


def refuse(access: Access, requested: str, resolved: str) -> ModelNotAllowed:
    via = f" (it resolves to '{resolved}')" if resolved != requested else ""
    allowed = ", ".join(access.allowed())
    return ModelNotAllowed(
        f"The key '{access.name}' may not use the model '{requested}'{via}; it may use: {allowed}",
        param="model",
    )
