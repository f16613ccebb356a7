"""What cost accounting adds to a priced request, in CPU time: the price lookup, the worst-case
bound and its reservation before the call, and the cost from usage and its settlement after,
exactly as dispatch does them (its own methods, on a real ledger with a SQLite store).

    python bench/cost.py [--requests 50000]

Prints microseconds of CPU per request (the target is under 30 µs) and the store's batch
writes, which happen on their own thread and are not on the request path.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

from nexus.config import BudgetSettings, PricingEntry, RoutingSettings
from nexus.cost.ledger import Ledger
from nexus.cost.meter import CostMeter
from nexus.cost.pricing import PriceBook
from nexus.dispatch import Dispatcher
from nexus.registry import Backend, Model, Registry, Status
from nexus.routing.planner import Router, RouteRequest, Step
from nexus.routing.requirements import chat_requirements
from nexus.state.sqlite import SQLiteStore
from nexus.telemetry.outcomes import Trace

BODY = {
    "model": "claude-sonnet-4-5",
    "messages": [
        {"role": "system", "content": "You are a careful assistant. " * 20},
        {"role": "user", "content": "Summarise the attached notes in three bullet points. " * 10},
    ],
    "max_tokens": 512,
}
USAGE = {
    "prompt_tokens": 900,
    "completion_tokens": 212,
    "total_tokens": 1112,
    "prompt_tokens_details": {"cached_tokens": 400, "cache_write_tokens": 100},
}


async def run(requests: int, directory: Path) -> tuple[float, float]:
    backend = Backend(name="claude", url="https://api.anthropic.com", type="anthropic")
    backend.status = Status.HEALTHY
    backend.zone = "open"
    backend.models = {"claude-sonnet-4-5": Model("claude-sonnet-4-5", context_length=200_000)}
    store = SQLiteStore(directory / "state.db")
    ledger = Ledger(BudgetSettings(monthly_limit_usd=1e9, hard_limit_action="block_cloud"), store)
    prices = PriceBook(
        [PricingEntry(model_pattern="local-*", input_per_mtok=0.1, output_per_mtok=0.1)]
    )
    prices.load()
    meter = CostMeter(prices, ledger)
    registry = Registry([backend])
    router = Router(registry, RoutingSettings())
    dispatcher = Dispatcher(registry, None, None, router, meter=meter)  # type: ignore[arg-type]
    request = RouteRequest("claude-sonnet-4-5", chat_requirements(BODY, {}, 2400))
    step = Step(backend, "claude-sonnet-4-5")
    trace = Trace()
    dispatcher._charge(step, request)  # the first lookup reads the snapshot: not per request
    cpu = time.process_time()
    wall = time.perf_counter()
    for _ in range(requests):
        charge = dispatcher._charge(step, request)
        trace.cost_usd = None
        dispatcher._settle(charge, step, request, trace, USAGE)
    cpu = time.process_time() - cpu
    wall = time.perf_counter() - wall
    await ledger.aclose()
    return cpu / requests * 1e6, wall / requests * 1e6


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=50_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as directory:
        cpu, wall = asyncio.run(run(args.requests, Path(directory)))
    print(f"cost accounting per priced request: {cpu:.2f} µs CPU ({wall:.2f} µs wall), "
          f"over {args.requests} requests (target: under 30 µs)")  # fmt: skip


if __name__ == "__main__":
    main()
