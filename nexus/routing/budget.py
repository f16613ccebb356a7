"""What routing needs to know of money, without depending on how it is kept: the budget's
status, whether the hard-limit action blocks a kind of backend, and a call's worst-case cost."""

from __future__ import annotations

from typing import Protocol

from ..registry import Backend

NORMAL, SOFT_LIMIT, HARD_LIMIT = "Normal", "SoftLimit", "HardLimit"


class BudgetView(Protocol):
    def status(self) -> str:
        """``Normal``, ``SoftLimit`` or ``HardLimit``."""
        ...

    def blocks(self, backend: Backend, model: str) -> bool:
        """At the hard limit, the configured action keeps ``model`` on ``backend`` out."""
        ...

    def worst_case(
        self, backend: Backend, model: str, prompt: int, max_tokens: int | None, embeddings: bool
    ) -> float | None:
        """The most a call to ``model`` on ``backend`` may cost (``prompt`` tokens at most, the
        client's ``max_tokens`` if set); None when it is free."""
        ...
