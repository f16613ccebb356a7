"""Prices and the ledger together: what a call may cost before it goes, and what it cost after.

The worst case of a call is its prompt bound (routing's: the larger of the text estimate and one
token per three bytes of the request, which also counts tools, images and JSON) at the input rate,
plus its output bound at the output rate: the client's ``max_tokens``, else the model's own output
limit, else what the context leaves, else ``DEFAULT_OUTPUT_LIMIT``. It implements routing's
``BudgetView``.
"""

from __future__ import annotations

from ..registry import Backend
from .ledger import Ledger
from .pricing import Price, PriceBook, Tokens

DEFAULT_OUTPUT_LIMIT = 16_384


class CostMeter:
    def __init__(self, prices: PriceBook, ledger: Ledger) -> None:
        self.prices = prices
        self.ledger = ledger

    def price(self, backend: Backend, model: str, *, quiet: bool = False) -> Price | None:
        return self.prices.price(backend.name, backend.type, backend.url, model, quiet=quiet)

    # --- BudgetView --------------------------------------------------------------------
    def status(self) -> str:
        return self.ledger.status()

    def blocks(self, backend: Backend, model: str) -> bool:
        """At the hard limit: ``block_cloud`` keeps out every open-zone backend, priced or not (a
        cloud model without a known price is not free); ``block_all`` also what is priced."""
        cloud = backend.zone == "open"
        if not self.ledger.blocks(cloud):
            return False
        return cloud or self.price(backend, model) is not None

    def worst_case(
        self, backend: Backend, model: str, prompt: int, max_tokens: int | None, embeddings: bool
    ) -> float | None:
        price = self.price(backend, model)
        if price is None:
            return None
        return self.bound(price, backend, model, prompt, max_tokens, embeddings)

    # --- per call ------------------------------------------------------------------------
    def bound(
        self,
        price: Price,
        backend: Backend,
        model: str,
        prompt: int,
        max_tokens: int | None,
        embeddings: bool,
    ) -> float:
        if embeddings:
            return price.worst_case(prompt, 0)
        return price.worst_case(prompt, output_bound(backend, model, max_tokens, prompt))

    @staticmethod
    def cost(price: Price, usage: object) -> tuple[float, Tokens] | None:
        """The cost of a call from the usage its backend reported; None without usage."""
        tokens = Tokens.from_usage(usage)
        if tokens is None:
            return None
        return price.cost(tokens), tokens


def output_bound(backend: Backend, model: str, max_tokens: int | None, prompt: int) -> int:
    """The most output tokens a call may produce."""
    if max_tokens is not None:
        return max_tokens
    record = backend.models.get(model)
    if record is not None:
        if record.max_output_tokens:
            return record.max_output_tokens
        if record.context_length:
            return max(record.context_length - prompt, 0)
    return DEFAULT_OUTPUT_LIMIT
