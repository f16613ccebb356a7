"""How long one routing decision takes: the planner over N backends that all serve the model.

    python bench/planner.py [--backends 50] [--plans 20000]

Every stage runs (health, capabilities, privacy with a policy, tier, quality, capacity) and the
smart strategy orders the survivors. Prints p50 / p99 / mean in microseconds.
"""

from __future__ import annotations

import argparse
import statistics
import time

from nexus.config import RoutingSettings, TrafficPolicy
from nexus.registry import Backend, Model, Registry, Status
from nexus.routing.affinity import affinity_keys
from nexus.routing.planner import Router, RouteRequest
from nexus.routing.requirements import chat_requirements


def build(count: int) -> Router:
    backends = []
    for i in range(count):
        backend = Backend(name=f"b{i:03d}", url=f"http://10.0.0.{i}:8000", type="vllm")
        backend.status = Status.HEALTHY
        backend.priority = i % 7 * 10
        backend.in_flight = i % 5
        backend.tier = 1 + i % 3
        backend.ewma_latency_ms = 50.0 + i
        backend.models = {"m": Model("m", context_length=8192, tools=True, json_mode=True)}
        backends.append(backend)
    routing = RoutingSettings(policies=[TrafficPolicy(model_pattern="m*", privacy="restricted")])
    return Router(Registry(backends), routing)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--backends", type=int, default=50)
    parser.add_argument("--plans", type=int, default=20_000)
    args = parser.parse_args()
    router = build(args.backends)
    body = {"model": "m", "messages": [{"role": "system", "content": "Be brief."},
                                       {"role": "user", "content": "Hello there"}]}  # fmt: skip
    samples = []
    for _ in range(args.plans):
        start = time.perf_counter_ns()
        request = RouteRequest(
            "m",
            chat_requirements(body, {}),
            affinity_keys=tuple(affinity_keys("m", body["messages"])),
        )
        plan = router.plan(request)
        samples.append(time.perf_counter_ns() - start)
        assert len(plan.steps) == args.backends
    samples.sort()
    us = [s / 1000 for s in samples[len(samples) // 10 :]]  # the first tenth is warm-up
    us.sort()
    p50, p99 = us[len(us) // 2], us[int(len(us) * 0.99)]
    print(
        f"planner, {args.backends} backends: p50 {p50:.1f} us, p99 {p99:.1f} us, "
        f"mean {statistics.fmean(us):.1f} us (target: well under 1000 us)"
    )


if __name__ == "__main__":
    main()
