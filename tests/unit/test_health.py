from __future__ import annotations

import asyncio
from typing import Any

from nexus.backends.base import Probe
from nexus.config import HealthCheckSettings
from nexus.errors import UpstreamUnavailable
from nexus.health import HealthChecker
from nexus.registry import Backend, Model, Registry, Status


class ScriptedAdapter:
    """Answers probes from a script: a list of models, or an exception to raise."""

    def __init__(self) -> None:
        self.script: list[Any] = []
        self.calls = 0

    def for_type(self, backend_type):
        return self

    async def probe(self, backend):
        self.calls += 1
        outcome = self.script.pop(0)
        if isinstance(outcome, Exception):
            raise outcome
        return Probe(outcome)


def make(failure=3, recovery=2, enabled=True):
    adapter = ScriptedAdapter()
    backend = Backend(name="b", url="http://b", type="vllm")
    registry = Registry([backend])
    settings = HealthCheckSettings(
        failure_threshold=failure, recovery_threshold=recovery, enabled=enabled
    )
    return HealthChecker(registry, adapter, settings), adapter, backend, registry


DOWN = UpstreamUnavailable("b", "refused")
UP = [Model("m")]


def run(checker, outcomes, adapter):
    adapter.script.extend(outcomes)
    for _ in outcomes:
        asyncio.run(checker.check_all())


def test_first_success_makes_unknown_healthy_and_lists_models():
    checker, adapter, backend, registry = make()
    run(checker, [UP], adapter)
    assert backend.status is Status.HEALTHY
    assert registry.backends_for("m") == [backend]
    assert backend.latency_ms is not None


def test_first_failure_makes_unknown_unhealthy():
    checker, adapter, backend, _ = make()
    run(checker, [DOWN], adapter)
    assert backend.status is Status.UNHEALTHY
    assert backend.last_error == "refused"


def test_healthy_needs_failure_threshold_failures_to_go_down():
    checker, adapter, backend, _ = make(failure=3)
    run(checker, [UP, DOWN, DOWN], adapter)
    assert backend.status is Status.HEALTHY
    run(checker, [DOWN], adapter)
    assert backend.status is Status.UNHEALTHY


def test_a_success_resets_the_failure_count():
    checker, adapter, backend, _ = make(failure=2)
    run(checker, [UP, DOWN, UP, DOWN], adapter)
    assert backend.status is Status.HEALTHY


def test_unhealthy_needs_recovery_threshold_successes():
    checker, adapter, backend, _ = make(recovery=2)
    run(checker, [DOWN, UP], adapter)
    assert backend.status is Status.UNHEALTHY
    run(checker, [UP], adapter)
    assert backend.status is Status.HEALTHY
    assert backend.last_error is None


def test_models_are_refreshed_on_every_success():
    checker, adapter, backend, registry = make()
    run(checker, [UP, [Model("n")]], adapter)
    assert list(backend.models) == ["n"]
    assert registry.backends_for("m") == []


def test_mark_down_is_immediate_and_schedules_a_probe():
    checker, adapter, backend, _ = make()
    run(checker, [UP], adapter)
    checker.mark_down(backend, "connection refused")
    assert backend.status is Status.UNHEALTHY
    assert checker._recheck == {"b"}


def test_without_health_checks_backends_are_trusted_and_never_marked_down():
    checker, adapter, backend, _ = make(enabled=False)
    adapter.script.append(DOWN)
    asyncio.run(checker.start())
    assert backend.status is Status.HEALTHY
    checker.mark_down(backend, "refused")
    assert backend.status is Status.HEALTHY


def test_backends_with_a_unavailable_are_never_probed():
    checker, adapter, backend, _ = make()
    backend.unavailable = "no key"
    asyncio.run(checker.check_all())
    assert adapter.calls == 0
