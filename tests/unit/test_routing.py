from __future__ import annotations

import pytest

from nexus.config import RoutingSettings
from nexus.errors import ModelNotFound, NoHealthyBackend
from nexus.registry import Backend, Model, Registry, Status
from nexus.routing.aliases import resolve
from nexus.routing.planner import plan_request
from nexus.routing.requirements import chat_requirements, embedding_requirements


def backend(name, *models, status=Status.HEALTHY, priority=50, in_flight=0, error=None):
    b = Backend(name=name, url=f"http://{name}", type="vllm", priority=priority)
    b.status = status
    b.in_flight = in_flight
    b.last_error = error
    b.models = {m: Model(m) for m in models}
    return b


def test_alias_resolution_follows_up_to_three_hops():
    aliases = {"a": "b", "b": "c", "c": "d"}
    assert resolve("a", aliases) == "d"
    assert resolve("c", aliases) == "d"
    assert resolve("x", aliases) == "x"


def test_requirements_from_a_plain_chat():
    req = chat_requirements({"messages": [{"role": "user", "content": "a" * 40}]}, {})
    assert req.estimated_tokens == 10
    assert not (req.vision or req.tools or req.json_mode or req.stream or req.high_priority)


def test_requirements_detect_vision_tools_json_stream_priority():
    body = {
        "stream": True,
        "tools": [{"type": "function", "function": {"name": "f"}}],
        "response_format": {"type": "json_schema", "json_schema": {"schema": {}}},
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "12345678"},
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA"}},
                ],
            }
        ],
    }
    req = chat_requirements(body, {"x-nexus-priority": " High "})
    assert (req.vision, req.tools, req.json_mode, req.stream, req.high_priority) == (
        True, True, True, True, True,
    )  # fmt: skip
    assert req.estimated_tokens == 2


def test_legacy_functions_and_json_object_count():
    body = {
        "functions": [{"name": "f"}],
        "response_format": {"type": "json_object"},
        "messages": [],
    }
    req = chat_requirements(body, {})
    assert req.tools and req.json_mode
    assert not chat_requirements({"tools": [], "messages": []}, {}).tools


def test_embedding_requirements_are_those_of_the_longest_input_not_the_sum():
    def tokens(value: object) -> int:
        return embedding_requirements({"input": value}).estimated_tokens

    assert tokens("aaaaaaaa") == 2
    assert tokens(["aaaa", "bbbbbbbb"]) == 2
    assert tokens(["x" * 400] * 100) == 100  # a batch of 100 short texts
    assert tokens([1, 2, 3, 4, 5]) == 5  # one input given as token ids
    assert tokens([[1, 2], [1, 2, 3], [4]]) == 3  # a batch of token arrays
    assert tokens(["abcdefgh", [1, 2, 3]]) == 3
    assert tokens([]) == 0


def test_priority_only_orders_by_priority_then_name():
    registry = Registry(
        [
            backend("c", "m", priority=10, in_flight=5),
            backend("b", "m", priority=10, in_flight=1),
            backend("a", "m", priority=10, in_flight=1),
            backend("z", "m", priority=1, in_flight=7),
        ]
    )
    plan = plan_request(registry, RoutingSettings(strategy="priority_only"), "m")
    assert [s.backend.name for s in plan.steps] == ["z", "a", "b", "c"]
    assert plan.route_reason(0) == "priority"
    assert plan.route_reason(1) == "failover"


def test_single_candidate_reason():
    plan = plan_request(Registry([backend("a", "m")]), RoutingSettings(), "m")
    assert plan.route_reason(0) == "only-candidate"


def test_unhealthy_backends_are_excluded_with_a_reason():
    registry = Registry(
        [backend("up", "m"), backend("down", "m", status=Status.UNHEALTHY, error="refused")]
    )
    plan = plan_request(registry, RoutingSettings(), "m")
    assert [s.backend.name for s in plan.steps] == ["up"]
    assert plan.exclusions[0].backend == "down"
    assert "refused" in plan.exclusions[0].reason


def test_unknown_model_lists_available_models_and_reachable_aliases():
    registry = Registry([backend("a", "m1", "m2"), backend("d", "m3", status=Status.UNHEALTHY)])
    routing = RoutingSettings(aliases={"fast": "m1", "broken": "nowhere"})
    with pytest.raises(ModelNotFound) as info:
        plan_request(registry, routing, "gpt-9")
    assert info.value.available == ["fast", "m1", "m2"]
    assert info.value.status_code == 404


def test_known_model_without_healthy_backend_is_503_with_context():
    registry = Registry([backend("d", "m", status=Status.UNHEALTHY, error="timeout")])
    with pytest.raises(NoHealthyBackend) as info:
        plan_request(registry, RoutingSettings(), "m")
    context = info.value.envelope()["context"]
    assert context["excluded"][0]["backend"] == "d"
    assert "timeout" in context["excluded"][0]["reason"]
    assert info.value.status_code == 503


def test_fallbacks_follow_the_primary_and_are_marked():
    registry = Registry(
        [backend("d", "big", status=Status.UNHEALTHY), backend("s", "small"), backend("t", "tiny")]
    )
    routing = RoutingSettings(fallbacks={"big": ["small", "tiny"]})
    plan = plan_request(registry, routing, "big")
    assert [(s.backend.name, s.fallback) for s in plan.steps] == [("s", "small"), ("t", "tiny")]
    assert plan.route_reason(0) == "fallback"


def test_fallbacks_apply_to_an_alias_target():
    registry = Registry([backend("s", "small")])
    routing = RoutingSettings(aliases={"gpt-4": "big"}, fallbacks={"big": ["small"]})
    plan = plan_request(registry, routing, "gpt-4")
    assert plan.resolved == "big"
    assert plan.steps[0].fallback == "small"


def test_bare_name_matches_ollama_latest_tag():
    registry = Registry([backend("o", "llama3.2:latest")])
    plan = plan_request(registry, RoutingSettings(), "llama3.2")
    assert plan.steps[0].model == "llama3.2:latest"


def test_a_guessed_no_does_not_lose_to_a_backend_privacy_rules_out():
    from nexus.config import TrafficPolicy
    from nexus.routing.planner import Router, RouteRequest
    from nexus.routing.requirements import Requirements

    local = backend("local", "m")  # vision unknown: guessed from the name, not reported
    cloud = backend("cloud", "m")
    cloud.zone = "open"
    cloud.models = {"m": Model("m", vision=True)}
    routing = RoutingSettings(policies=[TrafficPolicy(model_pattern="m", privacy="restricted")])
    plan = Router(Registry([local, cloud]), routing).plan(
        RouteRequest("m", Requirements(vision=True))
    )
    assert [s.backend.name for s in plan.steps] == ["local"]
    assert [(e.backend, e.stage) for e in plan.exclusions] == [("cloud", "privacy")]
