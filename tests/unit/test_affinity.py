"""Prefix-cache affinity: the keys of a request, the bounded expiring table, and how the router
puts a conversation's recent backend first."""

from __future__ import annotations

import pytest

from nexus.config import RoutingSettings
from nexus.registry import Backend, Model, Registry, Status
from nexus.routing import affinity
from nexus.routing.affinity import LONG_PROMPT_CHARS, AffinityTable, affinity_keys
from nexus.routing.planner import Plan, Router, RouteRequest

SHORT = {"role": "system", "content": "You are terse."}
LONG = {"role": "system", "content": "x" * LONG_PROMPT_CHARS}
HELLO = {"role": "user", "content": "hello"}
OTHER = {"role": "user", "content": "something else"}
REPLY = {"role": "assistant", "content": "hi"}
NEXT = {"role": "user", "content": "and then?"}


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


# --- keys ---------------------------------------------------------------------------------------


def test_a_short_system_prompt_gives_only_the_conversation_key():
    assert len(affinity_keys("m", [SHORT, HELLO])) == 1


def test_a_long_system_prompt_adds_a_second_key():
    assert len(affinity_keys("m", [LONG, HELLO])) == 2
    almost = {"role": "system", "content": "x" * (LONG_PROMPT_CHARS - 1)}
    assert len(affinity_keys("m", [almost, HELLO])) == 1


def test_long_system_prompt_counts_all_leading_system_and_developer_messages():
    half = "x" * (LONG_PROMPT_CHARS // 2)
    messages = [{"role": "system", "content": half}, {"role": "developer", "content": half}]
    assert len(affinity_keys("m", [*messages, HELLO])) == 2


def test_the_same_conversation_keeps_its_keys_across_turns():
    first = affinity_keys("m", [LONG, HELLO])
    later = affinity_keys("m", [LONG, HELLO, REPLY, NEXT])
    assert later == first
    assert affinity_keys("m", [HELLO, REPLY, NEXT]) == affinity_keys("m", [HELLO])


def test_another_conversation_shares_only_the_long_system_prompt_key():
    mine = affinity_keys("m", [LONG, HELLO])
    theirs = affinity_keys("m", [LONG, OTHER])
    assert mine[0] != theirs[0]
    assert mine[1] == theirs[1]
    assert affinity_keys("m", [SHORT, HELLO]) != affinity_keys("m", [SHORT, OTHER])


def test_keys_depend_on_the_model():
    assert affinity_keys("m", [SHORT, HELLO]) != affinity_keys("n", [SHORT, HELLO])


def test_no_messages_no_keys():
    assert affinity_keys("m", []) == []
    assert affinity_keys("m", ["not a message"]) == []


def test_a_system_prompt_alone_gives_one_key():
    assert len(affinity_keys("m", [LONG])) == 1


# --- the table ----------------------------------------------------------------------------------


def test_the_table_remembers_until_the_ttl_has_passed():
    table = AffinityTable(ttl_seconds=60)
    table.remember([1, 2], "b", now=100.0)
    assert table.lookup([1], now=160.0) == "b"
    assert table.lookup([2], now=160.0) == "b"
    assert table.lookup([1], now=160.5) is None
    assert table.lookup([3], now=100.0) is None


def test_remembering_again_renews_the_entry():
    table = AffinityTable(ttl_seconds=60)
    table.remember([1], "b", now=100.0)
    table.remember([1], "c", now=150.0)
    assert table.lookup([1], now=200.0) == "c"


def test_the_first_key_with_a_recent_backend_wins():
    table = AffinityTable(ttl_seconds=60)
    table.remember([2], "system-prompt-host", now=100.0)
    table.remember([1], "conversation-host", now=100.0)
    assert table.lookup([1, 2], now=110.0) == "conversation-host"
    assert table.lookup([9, 2], now=110.0) == "system-prompt-host"
    table.remember([1], "old", now=0.0)  # expired: the next key decides
    assert table.lookup([1, 2], now=110.0) == "system-prompt-host"


def test_the_table_is_bounded_and_drops_the_oldest():
    table = AffinityTable(ttl_seconds=60)
    for key in range(affinity.MAX_ENTRIES):
        table.remember([key], "b", now=100.0)
    table.remember([0], "b", now=100.0)  # renewed: now the newest
    table.remember([-1], "b", now=100.0)  # one over the bound
    assert table.lookup([1], now=100.0) is None  # the oldest went, and only it
    assert table.lookup([2], now=100.0) == "b"
    assert table.lookup([0], now=100.0) == "b"
    assert table.lookup([-1], now=100.0) == "b"


# --- in the router ------------------------------------------------------------------------------


def backend(name, priority=50, in_flight=0, status=Status.HEALTHY):
    b = Backend(name=name, url=f"http://{name}", type="vllm", priority=priority)
    b.status = status
    b.in_flight = in_flight
    b.models = {"m": Model("m")}
    return b


def router(clock, **routing):
    # "a" scores higher than "b" on priority, so without affinity "a" comes first
    registry = Registry([backend("a", priority=10), backend("b", priority=60)])
    return Router(registry, RoutingSettings(**routing), clock=clock)


def request(*messages) -> RouteRequest:
    return RouteRequest("m", affinity_keys=tuple(affinity_keys("m", list(messages))))


def first(plan: Plan) -> tuple[str, str]:
    return plan.steps[0].backend.name, plan.route_reason(0)


def test_a_later_turn_goes_to_the_remembered_backend_first():
    clock = Clock()
    r = router(clock)
    assert first(r.plan(request(SHORT, HELLO))) == ("a", "highest-score")
    r.remember(request(SHORT, HELLO), "b")
    clock.now += 5
    plan = r.plan(request(SHORT, HELLO, REPLY, NEXT))
    assert first(plan) == ("b", "affinity")
    assert [s.backend.name for s in plan.steps] == ["b", "a"]
    assert plan.route_reason(1) == "failover"


def test_a_long_shared_system_prompt_follows_its_backend_across_conversations():
    r = router(Clock())
    r.remember(request(LONG, HELLO), "b")
    assert first(r.plan(request(LONG, OTHER))) == ("b", "affinity")
    r.remember(request(SHORT, HELLO), "b")
    assert first(r.plan(request(SHORT, OTHER))) == ("a", "highest-score")


def test_affinity_expires_after_its_ttl():
    clock = Clock()
    r = router(clock, affinity_ttl_seconds=60)
    r.remember(request(SHORT, HELLO), "b")
    clock.now += 60
    assert first(r.plan(request(SHORT, HELLO))) == ("b", "affinity")
    clock.now += 1
    assert first(r.plan(request(SHORT, HELLO))) == ("a", "highest-score")


@pytest.mark.parametrize(
    "make_unusable",
    [
        pytest.param(lambda b: setattr(b, "in_flight", 100), id="saturated"),
        pytest.param(lambda b: setattr(b, "status", Status.UNHEALTHY), id="unhealthy"),
    ],
)
def test_affinity_never_picks_a_backend_that_cannot_serve(make_unusable):
    r = router(Clock())
    r.remember(request(SHORT, HELLO), "b")
    make_unusable(r.registry.get("b"))
    plan = r.plan(request(SHORT, HELLO))
    assert [s.backend.name for s in plan.steps] == ["a"]
    assert plan.route_reason(0) == "only-candidate"


def test_affinity_off_neither_remembers_nor_reorders():
    r = router(Clock(), affinity=False)
    r.remember(request(SHORT, HELLO), "b")
    assert r.affinity.lookup(request(SHORT, HELLO).affinity_keys, 1000.0) is None
    r.affinity.remember(request(SHORT, HELLO).affinity_keys, "b", 1000.0)  # even if present
    assert first(r.plan(request(SHORT, HELLO))) == ("a", "highest-score")


def test_a_request_without_keys_is_not_affected():
    r = router(Clock())
    r.remember(request(SHORT, HELLO), "b")
    assert first(r.plan(RouteRequest("m"))) == ("a", "highest-score")


def test_stable_keys_are_the_same_in_every_process():
    """Replicas sharing the table (shared_affinity) must agree on a conversation's key, whatever
    each process's string hash seed."""
    import subprocess
    import sys

    code = (
        "from nexus.routing.affinity import affinity_keys;"
        "print(affinity_keys('m', [{'role': 'user', 'content': 'hello'}], stable=True))"
    )
    seen = {
        subprocess.run(
            [sys.executable, "-c", code],
            env={"PYTHONHASHSEED": seed},
            capture_output=True,
            text=True,
            check=True,
        ).stdout  # fmt: skip
        for seed in ("1", "2")
    }
    assert len(seen) == 1
    assert seen.pop().strip() == str(affinity_keys("m", [HELLO], stable=True))
