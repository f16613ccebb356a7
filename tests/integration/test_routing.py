"""Routing through the running app: scores and reasons, privacy, tiers, capabilities, the queue,
half-open quality recovery, prefix-cache affinity and the simpler strategies.

Every test runs the real app on a loopback port against fake upstreams and talks to it with a
real HTTP client. Requests that must stay in flight are held by a gate in the fake (released by
the test), never by a delay; background requests run in threads and the tests wait for
conditions (a call recorded by a fake, the queue's depth), never for time.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import socket
import threading
from collections.abc import Callable, Iterator
from typing import Any

import httpx2
import pytest
from aiohttp import web

from nexus.queueing import RequestQueue
from nexus.registry import Backend
from tests.fakes import FakeOllama, FakeOpenAI, FakeUpstream, Reply
from tests.harness import NexusServer, data_events, settings_for, wait_for

CHAT = "/v1/chat/completions"
OLLAMA_CHAT = "/api/chat"
HOLD = "[hold]"  # a chat request whose body carries this waits in a GatedOpenAI until released
PNG_B64 = base64.b64encode(b"\x89PNG\r\n\x1a\nfake-image-bytes").decode()
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather for a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
]
_serial = itertools.count()

Messages = list[dict[str, Any]]


# --- helpers ----------------------------------------------------------------------------------


def backend(
    name: str, url: str, priority: int = 50, kind: str = "vllm", **extra: Any
) -> dict[str, Any]:
    return {"name": name, "url": url, "type": kind, "priority": priority, **extra}


def user(text: str) -> Messages:
    return [{"role": "user", "content": text}]


def fresh(label: str = "hi") -> Messages:
    """A message no other request sends: a new conversation, so affinity stays out of the way."""
    return user(f"{label} #{next(_serial)}")


def post(
    http: httpx2.Client,
    nexus: NexusServer,
    messages: Messages | None = None,
    *,
    model: str = "mock-model",
    headers: dict[str, str] | None = None,
    stream: bool = False,
    **extra: Any,
) -> httpx2.Response:
    body: dict[str, Any] = {"model": model, "messages": messages or fresh(), **extra}
    if stream:
        body["stream"] = True
    return http.post(nexus.url + CHAT, json=body, headers=headers or {})


def served_by(resp: httpx2.Response) -> str:
    assert resp.status_code == 200, resp.text
    return resp.headers["x-nexus-backend"]


def reason(resp: httpx2.Response) -> str:
    assert resp.status_code == 200, resp.text
    return resp.headers["x-nexus-route-reason"]


def envelope(message: str = "boom") -> dict[str, Any]:
    return {"error": {"message": message, "type": "server_error", "param": None, "code": None}}


def failing(status: int = 500) -> Reply:
    return Reply(status=status, json=envelope(f"upstream {status}"))


def rejection(
    resp: httpx2.Response, status: int = 503
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """A refusal's JSON ``context`` and its X-Nexus-Rejection-Details (checked to agree): a 503,
    or a 400 ``capability_mismatch`` when only what the request needs left every backend out."""
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].startswith("application/json")
    body = resp.json()
    if status == 400:
        assert body["error"]["code"] == "capability_mismatch"
    else:
        assert body["error"]["type"] == "service_unavailable"
    context: dict[str, Any] = body["context"]
    details: list[dict[str, Any]] = json.loads(resp.headers["x-nexus-rejection-details"])
    assert details == context["excluded"]
    return context, details


def stages(details: list[dict[str, Any]]) -> set[str]:
    return {item["stage"] for item in details}


def first_text(call: Any) -> str:
    """The text of the first message a fake received (OpenAI or Ollama body)."""
    content = call.json["messages"][0]["content"]
    assert isinstance(content, str)
    return content


def state(nexus: NexusServer, name: str) -> Backend:
    """The gateway's own record of a backend."""
    record = nexus.gateway.registry.get(name)
    assert record is not None, name
    return record


def queue_of(nexus: NexusServer) -> RequestQueue:
    queue = nexus.gateway.dispatcher.queue
    assert queue is not None, "the queue should be enabled"
    return queue


class InBackground:
    """One request sent from a thread with its own client; ``result`` joins and returns it."""

    def __init__(self, send: Callable[[httpx2.Client], httpx2.Response]) -> None:
        self.send = send
        self.response: httpx2.Response | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            with httpx2.Client(timeout=30) as http:
                self.response = self.send(http)
        except BaseException as exc:  # re-raised in the test's thread by result()
            self.error = exc

    def result(self, timeout: float = 30.0) -> httpx2.Response:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the background request did not finish"
        if self.error is not None:
            raise self.error
        assert self.response is not None
        return self.response


class GatedOpenAI(FakeOpenAI):
    """Chat requests whose body contains HOLD are recorded at once but answered only after
    ``release`` is set; everything else is answered as usual."""

    def __init__(self, models: list[str] | None = None) -> None:
        super().__init__(models)
        self.release = threading.Event()

    async def _answer(self, request: web.Request, reply: Reply) -> web.StreamResponse:
        raw = await request.read()  # aiohttp keeps the body read by _handle
        if request.path == CHAT and HOLD.encode() in raw:
            await asyncio.to_thread(self.release.wait, 60)  # the test's gate (bounded)
        return await super()._answer(request, reply)


@pytest.fixture
def gated(start_fake: Callable[[FakeUpstream], Any], start_nexus: Any) -> Iterator[Any]:
    """Start GatedOpenAI fakes; their gates are opened before Nexus and the fakes stop."""
    fakes: list[GatedOpenAI] = []

    def make(models: list[str] | None = None) -> GatedOpenAI:
        fake: GatedOpenAI = start_fake(GatedOpenAI(models))
        fakes.append(fake)
        return fake

    yield make
    for fake in fakes:
        fake.release.set()


@pytest.fixture
def dead_url() -> Iterator[Callable[[], str]]:
    """URLs of loopback ports that are bound but not listening: connections are refused."""
    held: list[socket.socket] = []

    def make() -> str:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
        held.append(sock)
        return f"http://127.0.0.1:{sock.getsockname()[1]}"

    yield make
    for sock in held:
        sock.close()


# --- 1. failover order and route reasons ------------------------------------------------------


def test_failover_walks_to_the_next_best_backend(start_fake, start_nexus, client):
    fakes = {name: start_fake(FakeOpenAI()) for name in ("best", "second", "third")}
    fakes["best"].push(CHAT, failing(503))
    nexus = start_nexus(
        settings_for(
            backends=[
                backend("third", fakes["third"].url, 30),
                backend("best", fakes["best"].url, 10),
                backend("second", fakes["second"].url, 20),
            ]
        )
    )

    resp = post(client, nexus)

    assert served_by(resp) == "second"
    assert reason(resp) == "failover"
    assert resp.json()["choices"][0]["message"]["content"] == "Hello!"
    assert [len(fakes[n].calls(CHAT)) for n in ("best", "second", "third")] == [1, 1, 0]

    again = post(client, nexus)  # the failure was a one-off: the best backend serves again
    assert served_by(again) == "best"
    assert reason(again) == "highest-score"


def test_route_reason_highest_score_and_only_candidate(start_fake, start_nexus, client):
    both = start_fake(FakeOpenAI(models=["mock-model", "solo-model"]))
    other = start_fake(FakeOpenAI(models=["mock-model"]))
    nexus = start_nexus(
        settings_for(backends=[backend("both", both.url, 10), backend("other", other.url, 20)])
    )

    for stream in (False, True):
        resp = post(client, nexus, stream=stream)
        assert served_by(resp) == "both"
        assert reason(resp) == "highest-score"

        solo = post(client, nexus, model="solo-model", stream=stream)
        assert served_by(solo) == "both"
        assert reason(solo) == "only-candidate"
    assert other.calls(CHAT) == []


# --- 2. privacy -------------------------------------------------------------------------------

SECRET_POLICY = {"policies": [{"model_pattern": "secret-*", "privacy": "restricted"}]}


def test_restricted_model_goes_only_to_restricted_backends(start_fake, start_nexus, client):
    open_fake = start_fake(FakeOpenAI(models=["secret-model", "public-model"]))
    local = start_fake(FakeOpenAI(models=["secret-model"]))
    nexus = start_nexus(
        settings_for(
            backends=[
                # The open backend has the better priority: only the policy keeps it out.
                backend("cloudish", open_fake.url, 1, zone="open"),
                backend("local", local.url, 90, zone="restricted"),
            ],
            routing=SECRET_POLICY,
        )
    )

    for stream in (False, True, False, True):
        resp = post(client, nexus, model="secret-model", stream=stream)
        assert served_by(resp) == "local"
        assert resp.headers["x-nexus-privacy-zone"] == "restricted"
        assert reason(resp) == "only-candidate"
    assert open_fake.calls(CHAT) == []

    # A model no policy restricts may use the open backend, and the header says so.
    public = post(client, nexus, model="public-model")
    assert served_by(public) == "cloudish"
    assert public.headers["x-nexus-privacy-zone"] == "open"


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_restricted_failure_is_not_retried_in_the_open_zone(
    start_fake, start_nexus, client, stream
):
    open_fake = start_fake(FakeOpenAI(models=["secret-model"]))
    local = start_fake(FakeOpenAI(models=["secret-model"]))
    local.push(CHAT, failing(500))
    nexus = start_nexus(
        settings_for(
            backends=[
                backend("cloudish", open_fake.url, 1, zone="open"),
                backend("local", local.url, 90, zone="restricted"),
            ],
            routing=SECRET_POLICY,
        )
    )

    resp = post(client, nexus, model="secret-model", stream=stream)

    assert resp.status_code in (502, 503), resp.text
    assert "error" in resp.json()
    assert "x-nexus-backend" not in resp.headers
    assert len(local.calls(CHAT)) == 1
    assert open_fake.calls(CHAT) == []


def test_restricted_model_only_in_the_open_zone_is_refused_with_reasons(
    start_fake, start_nexus, client
):
    open_fake = start_fake(FakeOpenAI(models=["secret-model"]))
    local = start_fake(FakeOpenAI(models=["other-model"]))
    nexus = start_nexus(
        settings_for(
            backends=[
                backend("cloudish", open_fake.url, 1, zone="open"),
                backend("local", local.url, 90, zone="restricted"),
            ],
            routing=SECRET_POLICY,
        )
    )

    resp = post(client, nexus, model="secret-model")

    context, details = rejection(resp)
    assert context["privacy_zone_required"] == "restricted"
    assert stages(details) == {"privacy"}
    assert details[0]["backend"] == "cloudish"
    assert "privacy" in resp.headers["x-nexus-rejection-reasons"]
    assert open_fake.calls(CHAT) == []


def test_open_fallback_model_is_not_used_for_a_restricted_request(start_fake, start_nexus, client):
    open_fake = start_fake(FakeOpenAI(models=["public-model"]))
    local = start_fake(FakeOpenAI(models=["secret-model"]))
    local.push(CHAT, failing(500))
    nexus = start_nexus(
        settings_for(
            backends=[
                backend("cloudish", open_fake.url, 1, zone="open"),
                backend("local", local.url, 90, zone="restricted"),
            ],
            routing={**SECRET_POLICY, "fallbacks": {"secret-model": ["public-model"]}},
        )
    )

    failed = post(client, nexus, model="secret-model")  # the restricted backend fails
    assert failed.status_code in (502, 503), failed.text
    assert len(local.calls(CHAT)) == 1
    assert "x-nexus-fallback-model" not in failed.headers
    assert open_fake.calls(CHAT) == []

    # The fallback model itself, asked for directly, is not restricted.
    public = post(client, nexus, model="public-model")
    assert served_by(public) == "cloudish"


def test_open_fallback_refused_with_privacy_reason_when_nobody_restricted_lists_the_model(
    start_fake, start_nexus, client
):
    open_fake = start_fake(FakeOpenAI(models=["secret-model", "public-model"]))
    nexus = start_nexus(
        settings_for(
            backends=[backend("cloudish", open_fake.url, 1, zone="open")],
            routing={**SECRET_POLICY, "fallbacks": {"secret-model": ["public-model"]}},
        )
    )

    resp = post(client, nexus, model="secret-model")

    context, details = rejection(resp)
    assert context["privacy_zone_required"] == "restricted"
    assert {(d["model"], d["stage"]) for d in details} == {
        ("secret-model", "privacy"),
        ("public-model", "privacy"),
    }
    assert open_fake.calls(CHAT) == []


# --- 3. tiers ---------------------------------------------------------------------------------

TIER_POLICY = {"policies": [{"model_pattern": "tiered-*", "min_tier": 2}]}


def tiered_settings(t1: str, t2: str, t3: str) -> Any:
    return settings_for(
        backends=[
            # Tier 1 has the best priority and tier 3 the next: only the policy decides.
            backend("t1", t1, 1, tier=1),
            backend("t2", t2, 50, tier=2),
            backend("t3", t3, 10, tier=3),
        ],
        routing=TIER_POLICY,
    )


def test_strict_tier_is_the_exact_tier(start_fake, start_nexus, client):
    fakes = [start_fake(FakeOpenAI(models=["tiered-model"])) for _ in range(3)]
    nexus = start_nexus(tiered_settings(*(fake.url for fake in fakes)))

    for headers in ({}, {"X-Nexus-Strict": "true"}, {"X-Nexus-Flexible": "true"}):
        for stream in (False, True):
            resp = post(client, nexus, model="tiered-model", headers=headers, stream=stream)
            assert served_by(resp) == "t2", headers
    assert fakes[0].calls(CHAT) == []
    assert fakes[2].calls(CHAT) == []


def test_without_the_exact_tier_strict_refuses_and_flexible_goes_higher(
    start_fake, start_nexus, client, dead_url
):
    t1 = start_fake(FakeOpenAI(models=["tiered-model"]))
    t3 = start_fake(FakeOpenAI(models=["tiered-model"]))
    nexus = start_nexus(tiered_settings(t1.url, dead_url(), t3.url))
    assert not state(nexus, "t2").healthy

    for headers in (
        {},
        {"X-Nexus-Strict": "true"},
        {"X-Nexus-Strict": "true", "X-Nexus-Flexible": "true"},  # strict wins
    ):
        resp = post(client, nexus, model="tiered-model", headers=headers)
        context, details = rejection(resp)
        assert context["required_tier"] == 2
        assert stages(details) == {"tier"}
        assert {d["backend"] for d in details} == {"t1", "t3"}
        assert "tier" in resp.headers["x-nexus-rejection-reasons"]

    for stream in (False, True, False):
        flexible = post(
            client,
            nexus,
            model="tiered-model",
            headers={"X-Nexus-Flexible": "true"},
            stream=stream,
        )
        assert served_by(flexible) == "t3"
    assert t1.calls(CHAT) == []
    assert len(t3.calls(CHAT)) == 3


# --- 4. capabilities --------------------------------------------------------------------------


def image_message() -> Messages:
    return [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": f"what is this? #{next(_serial)}"},
                {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG_B64}"}},
            ],
        }
    ]


def test_vision_request_goes_only_to_a_vision_model(start_fake, start_nexus, client):
    plain = start_fake(FakeOllama(capabilities=["completion"]))
    seeing = start_fake(FakeOllama(capabilities=["completion", "vision"]))
    nexus = start_nexus(
        settings_for(
            backends=[
                backend("plain", plain.url, 1, kind="ollama"),
                backend("seeing", seeing.url, 90, kind="ollama"),
            ]
        )
    )
    model = "llama3.2:latest"

    assert served_by(post(client, nexus, model=model)) == "plain"  # the preferred one
    for stream in (False, True):
        resp = post(client, nexus, image_message(), model=model, stream=stream)
        assert served_by(resp) == "seeing"
        assert reason(resp) == "only-candidate"
    assert len(plain.calls(OLLAMA_CHAT)) == 1
    assert all(call.json["messages"][0].get("images") for call in seeing.calls(OLLAMA_CHAT))

    # Without any vision model the request is refused, naming the capability.
    only_plain = start_nexus(settings_for(backends=[backend("plain", plain.url, 1, kind="ollama")]))
    refused = post(client, only_plain, image_message(), model=model)
    context, details = rejection(refused, 400)
    assert stages(details) == {"capabilities"}
    assert "vision" in details[0]["reason"]
    assert len(plain.calls(OLLAMA_CHAT)) == 1


def test_tools_request_goes_only_to_a_tools_model(start_fake, start_nexus, client):
    plain = start_fake(FakeOllama(capabilities=["completion"]))
    tooled = start_fake(FakeOllama(capabilities=["completion", "tools"]))
    nexus = start_nexus(
        settings_for(
            backends=[
                backend("plain", plain.url, 1, kind="ollama"),
                backend("tooled", tooled.url, 90, kind="ollama"),
            ]
        )
    )
    model = "llama3.2:latest"

    assert served_by(post(client, nexus, model=model)) == "plain"
    for _ in range(3):
        resp = post(client, nexus, model=model, tools=TOOLS)
        assert served_by(resp) == "tooled"
    assert len(plain.calls(OLLAMA_CHAT)) == 1
    assert all(call.json.get("tools") for call in tooled.calls(OLLAMA_CHAT))


def test_prompt_longer_than_the_context_is_excluded(start_fake, start_nexus, client):
    small = start_fake(FakeOllama(context_length=50))
    large = start_fake(FakeOllama(context_length=8192))
    long_prompt = user("x" * 1000)
    model = "llama3.2:latest"
    nexus = start_nexus(
        settings_for(
            backends=[
                backend("small", small.url, 1, kind="ollama"),
                backend("large", large.url, 90, kind="ollama"),
            ]
        )
    )

    assert served_by(post(client, nexus, model=model)) == "small"  # short prompts fit
    assert served_by(post(client, nexus, long_prompt, model=model)) == "large"
    assert len(small.calls(OLLAMA_CHAT)) == 1

    only_small = start_nexus(settings_for(backends=[backend("small", small.url, 1, kind="ollama")]))
    refused = post(client, only_small, long_prompt, model=model)
    context, details = rejection(refused, 400)
    assert stages(details) == {"capabilities"}
    assert details[0]["backend"] == "small"
    assert "context_length" in details[0]["reason"]
    assert "capabilities" in refused.headers["x-nexus-rejection-reasons"]
    assert len(small.calls(OLLAMA_CHAT)) == 1


# --- 5. the queue -----------------------------------------------------------------------------


def one_slot(fake: FakeUpstream, **queue: Any) -> Any:
    sections: dict[str, Any] = {"queue": queue} if queue else {}
    return settings_for(backends=[backend("only", fake.url, max_concurrent=1)], **sections)


def occupy(nexus: NexusServer, fake: GatedOpenAI) -> InBackground:
    """Take the only slot with a request the fake holds; returns once the fake has it."""
    before = len(fake.calls(CHAT))
    held = InBackground(lambda http: post(http, nexus, user(f"occupier {HOLD}")))
    assert wait_for(lambda: len(fake.calls(CHAT)) == before + 1)
    assert state(nexus, "only").in_flight == 1
    return held


def enqueue(nexus: NexusServer, depth: int, send: Callable[[httpx2.Client], httpx2.Response]):
    """Send a request in the background and wait until it waits in the queue."""
    waiting = InBackground(send)
    assert wait_for(lambda: queue_of(nexus).depth == depth), "the request was not queued"
    return waiting


def assert_usual_headers(resp: httpx2.Response, route_reason: str) -> None:
    assert resp.status_code == 200, resp.text
    assert resp.headers["x-nexus-backend"] == "only"
    assert resp.headers["x-nexus-backend-type"] == "local"
    assert resp.headers["x-nexus-route-reason"] == route_reason
    assert resp.headers["x-nexus-privacy-zone"] == "restricted"
    assert resp.headers["x-request-id"]


def assert_saturated(resp: httpx2.Response) -> None:
    context, details = rejection(resp)
    assert int(resp.headers["retry-after"]) >= 1
    assert stages(details) == {"capacity"}
    assert "capacity" in resp.headers["x-nexus-rejection-reasons"]


def test_saturated_request_waits_in_the_queue_and_is_served(gated, start_nexus):
    fake = gated()
    nexus = start_nexus(one_slot(fake))
    held = occupy(nexus, fake)

    waiting = enqueue(nexus, 1, lambda http: post(http, nexus, user("second")))
    assert len(fake.calls(CHAT)) == 1  # not sent upstream while the slot is taken
    fake.release.set()

    assert_usual_headers(held.result(), "only-candidate")
    queued = waiting.result()
    assert_usual_headers(queued, "queued")
    assert queued.json()["choices"][0]["message"]["content"] == "Hello!"
    assert [first_text(call) for call in fake.calls(CHAT)] == [f"occupier {HOLD}", "second"]
    assert queue_of(nexus).depth == 0
    assert state(nexus, "only").in_flight == 0


def test_high_priority_leaves_the_queue_first(gated, start_nexus):
    fake = gated()
    nexus = start_nexus(one_slot(fake))
    held = occupy(nexus, fake)

    normal = enqueue(nexus, 1, lambda http: post(http, nexus, user("normal")))
    high = enqueue(
        nexus, 2, lambda http: post(http, nexus, user("high"), headers={"X-Nexus-Priority": "high"})
    )
    fake.release.set()

    held.result()
    assert reason(high.result()) == "queued"
    assert reason(normal.result()) == "queued"
    order = [first_text(call) for call in fake.calls(CHAT)]
    assert order == [f"occupier {HOLD}", "high", "normal"]


def test_full_queue_answers_503_with_retry_after_at_once(gated, start_nexus, client):
    fake = gated()
    nexus = start_nexus(one_slot(fake, max_size=1))
    held = occupy(nexus, fake)
    waiting = enqueue(nexus, 1, lambda http: post(http, nexus, user("waits")))

    refused = post(client, nexus, user("no room"))

    assert_saturated(refused)
    assert "queue is full" in refused.json()["error"]["message"]
    assert queue_of(nexus).depth == 1
    fake.release.set()
    held.result()
    assert reason(waiting.result()) == "queued"
    assert "no room" not in [first_text(call) for call in fake.calls(CHAT)]


def test_queue_wait_has_a_limit(gated, start_nexus):
    fake = gated()
    nexus = start_nexus(one_slot(fake, max_wait_seconds=1))
    held = occupy(nexus, fake)

    # The slot stays taken; a client that waits 15 times the limit gets the 503, not a timeout.
    with httpx2.Client(timeout=15) as patient:
        resp = post(patient, nexus, user("gives up"))

    assert_saturated(resp)
    assert resp.headers["retry-after"] == "1"  # the configured wait, at least 1 s
    assert "queue" in resp.json()["error"]["message"]
    assert queue_of(nexus).depth == 0
    fake.release.set()
    assert reason(held.result()) == "only-candidate"
    assert len(fake.calls(CHAT)) == 1


def test_streaming_request_is_queued_and_streams(gated, start_nexus):
    fake = gated()
    nexus = start_nexus(one_slot(fake))
    held = occupy(nexus, fake)

    waiting = enqueue(nexus, 1, lambda http: post(http, nexus, user("streamed"), stream=True))
    fake.release.set()

    held.result()
    resp = waiting.result()
    assert_usual_headers(resp, "queued")
    assert resp.headers["content-type"].startswith("text/event-stream")
    events = data_events(resp.text)
    assert events[-1] == "[DONE]"
    words = [json.loads(e)["choices"][0]["delta"].get("content", "") for e in events[:-1]]
    assert "".join(words) == "Hello there!"
    assert fake.calls(CHAT)[-1].json["stream"] is True


def test_unknown_model_is_404_at_once_while_the_queue_is_full(gated, start_nexus, client):
    fake = gated()
    nexus = start_nexus(one_slot(fake, max_size=1))
    held = occupy(nexus, fake)
    waiting = enqueue(nexus, 1, lambda http: post(http, nexus, user("waits")))

    for stream in (False, True):
        resp = post(client, nexus, model="no-such-model", stream=stream)
        assert resp.status_code == 404, resp.text
        assert resp.json()["error"]["code"] == "model_not_found"
    assert queue_of(nexus).depth == 1

    fake.release.set()
    held.result()
    waiting.result()


def test_without_the_queue_saturation_is_503_at_once(gated, start_nexus, client):
    fake = gated()
    nexus = start_nexus(one_slot(fake, enabled=False))
    assert nexus.gateway.dispatcher.queue is None
    held = occupy(nexus, fake)

    for stream in (False, True):
        resp = post(client, nexus, user("turned away"), stream=stream)
        assert_saturated(resp)
    assert len(fake.calls(CHAT)) == 1

    fake.release.set()
    assert reason(held.result()) == "only-candidate"


# --- 5b. the queue and capacity that comes back -----------------------------------------------


class GatedOllama(FakeOllama):
    """GatedOpenAI's gate on Ollama's /api/chat, with the capabilities /api/show reports."""

    def __init__(self, capabilities: list[str]) -> None:
        super().__init__(capabilities=capabilities)
        self.release = threading.Event()

    async def _answer(self, request: web.Request, reply: Reply) -> web.StreamResponse:
        raw = await request.read()
        if request.path == OLLAMA_CHAT and HOLD.encode() in raw:
            await asyncio.to_thread(self.release.wait, 60)  # the test's gate (bounded)
        return await super()._answer(request, reply)


@pytest.fixture
def text_and_vision(start_fake: Callable[[FakeUpstream], Any], start_nexus: Any) -> Iterator[Any]:
    """Nexus with two one-slot Ollama backends for one model: "text" (preferred) and "eyes"
    (vision too). Yields (nexus, text, eyes); their gates are opened at the end."""
    text: GatedOllama = start_fake(GatedOllama(["completion"]))
    eyes: GatedOllama = start_fake(GatedOllama(["completion", "vision"]))
    nexus = start_nexus(
        settings_for(
            backends=[
                backend("text", text.url, 1, kind="ollama", max_concurrent=1),
                backend("eyes", eyes.url, 90, kind="ollama", max_concurrent=1),
            ],
            queue={"max_wait_seconds": 5},  # long enough to be served, short enough to fail
        )
    )
    yield nexus, text, eyes
    text.release.set()
    eyes.release.set()


MODEL = "llama3.2:latest"


def held_on(nexus: NexusServer, name: str, messages: Messages) -> InBackground:
    held = InBackground(lambda http: post(http, nexus, messages, model=MODEL))
    assert wait_for(lambda: state(nexus, name).in_flight == 1), f"{name} was not taken"
    return held


def vision_held() -> Messages:
    message = image_message()
    message[0]["content"][0]["text"] += f" {HOLD}"
    return message


def test_a_text_request_does_not_wait_behind_a_vision_request_when_text_is_free(
    text_and_vision, client
):
    nexus, text, eyes = text_and_vision
    held = held_on(nexus, "eyes", vision_held())
    vision = enqueue(nexus, 1, lambda http: post(http, nexus, image_message(), model=MODEL))

    resp = post(client, nexus, fresh("plain text"), model=MODEL)

    assert served_by(resp) == "text"
    assert queue_of(nexus).depth == 1  # the vision request still waits for its backend
    eyes.release.set()
    assert served_by(held.result()) == "eyes"
    assert served_by(vision.result()) == "eyes"
    assert reason(vision.result()) == "queued"


def test_a_freed_text_backend_wakes_the_text_request_not_the_vision_one_ahead(text_and_vision):
    nexus, text, eyes = text_and_vision
    held_text = held_on(nexus, "text", user(f"text {HOLD}"))
    held_eyes = held_on(nexus, "eyes", vision_held())
    vision = enqueue(nexus, 1, lambda http: post(http, nexus, image_message(), model=MODEL))
    plain = enqueue(nexus, 2, lambda http: post(http, nexus, fresh("plain"), model=MODEL))

    text.release.set()

    assert served_by(held_text.result()) == "text"
    assert served_by(plain.result()) == "text"
    assert reason(plain.result()) == "queued"
    assert queue_of(nexus).depth == 1 and state(nexus, "eyes").in_flight == 1
    eyes.release.set()
    assert served_by(held_eyes.result()) == "eyes"
    assert served_by(vision.result()) == "eyes"


def test_a_backend_that_recovers_serves_the_queue_at_once(gated, start_fake, start_nexus):
    busy = gated()
    sick = start_fake(FakeOpenAI())
    sick.push("/v1/models", *[failing(500) for _ in range(1000)])  # down until the test clears it
    nexus = start_nexus(
        settings_for(
            backends=[backend("only", busy.url, max_concurrent=1), backend("sick", sick.url)],
            health_check={"interval_seconds": 0.1, "recovery_threshold": 1},
            queue={"max_wait_seconds": 10},
        )
    )
    assert wait_for(lambda: state(nexus, "sick").status.value == "unhealthy")
    held = occupy(nexus, busy)
    waiting = enqueue(nexus, 1, lambda http: post(http, nexus, user("waits")))

    sick.script["/v1/models"].clear()

    assert served_by(waiting.result()) == "sick"
    assert state(nexus, "only").in_flight == 1  # not a slot freed on the busy one
    busy.release.set()
    held.result()


def test_a_backend_added_through_the_admin_api_serves_the_queue_at_once(
    gated, start_fake, start_nexus, client
):
    busy = gated()
    extra = start_fake(FakeOpenAI())
    nexus = start_nexus(one_slot(busy, max_wait_seconds=10))
    held = occupy(nexus, busy)
    waiting = enqueue(nexus, 1, lambda http: post(http, nexus, user("waits")))

    added = client.post(
        nexus.url + "/admin/backends", json={"name": "extra", "url": extra.url, "type": "vllm"}
    )

    assert added.status_code == 201, added.text
    assert served_by(waiting.result()) == "extra"
    assert state(nexus, "only").in_flight == 1
    busy.release.set()
    held.result()


# --- 6. half-open recovery --------------------------------------------------------------------

QUALITY = {
    "error_rate_threshold": 0.5,
    "min_requests": 2,
    "trial_interval_seconds": 1,
    "window_seconds": 60,
}


def test_excluded_backend_comes_back_after_a_successful_trial(start_fake, start_nexus, client):
    a, b = start_fake(FakeOpenAI()), start_fake(FakeOpenAI())
    a.push(CHAT, *[failing(500) for _ in range(1000)])  # failing until the test clears it
    nexus = start_nexus(
        settings_for(
            backends=[backend("a", a.url, 1), backend("b", b.url, 10)],
            quality=QUALITY,
        )
    )

    first = post(client, nexus)
    assert served_by(first) == "b"
    assert reason(first) == "failover"

    # A few requests later A is excluded: B serves as the only candidate, A is not even tried.
    excluded: list[httpx2.Response] = []

    def a_excluded() -> bool:
        resp = post(client, nexus)
        assert served_by(resp) == "b"
        excluded.append(resp)
        return reason(resp) == "only-candidate"

    assert wait_for(a_excluded, timeout=10)
    assert len(excluded) <= 5
    tried = len(a.calls(CHAT))
    for _ in range(3):
        resp = post(client, nexus)
        assert served_by(resp) == "b"
        assert reason(resp) == "only-candidate"
    assert len(a.calls(CHAT)) == tried

    # While A still fails, its trial (one request, after the trial interval) fails: A stays out.
    def a_tried() -> bool:
        assert served_by(post(client, nexus)) == "b"
        return len(a.calls(CHAT)) > tried

    assert wait_for(a_tried, timeout=10), "no trial request reached A"
    assert len(a.calls(CHAT)) == tried + 1
    after_trial = post(client, nexus)
    assert served_by(after_trial) == "b"
    assert reason(after_trial) == "only-candidate"

    # A is well again: the next trial reaches it, succeeds, and A is back.
    a.script[CHAT].clear()
    answers: list[httpx2.Response] = []

    def served_by_a() -> bool:
        answers.append(post(client, nexus))
        return served_by(answers[-1]) == "a"

    assert wait_for(served_by_a, timeout=10), "A did not come back"
    assert reason(answers[-1]) == "trial"
    for _ in range(3):
        resp = post(client, nexus)
        assert served_by(resp) == "a"
        assert reason(resp) == "highest-score"


def test_half_open_trial_reaches_the_backend_for_a_repeated_conversation(
    start_fake, start_nexus, client
):
    """A conversation first sent while A is excluded is served (and remembered) by B; the client
    then repeats it (affinity on, the default). When A is well again its half-open trial must still
    reach A, so A comes back within the trial interval rather than when the window expires."""
    a, b = start_fake(FakeOpenAI()), start_fake(FakeOpenAI())
    a.push(CHAT, *[failing(500) for _ in range(1000)])
    nexus = start_nexus(
        settings_for(
            backends=[backend("a", a.url, 1), backend("b", b.url, 10)],
            quality=QUALITY,
        )
    )
    assert wait_for(lambda: reason(post(client, nexus)) == "only-candidate", timeout=10)
    same = user("the same question")
    assert served_by(post(client, nexus, same)) == "b"  # served, and remembered, by B
    a.script[CHAT].clear()
    tried = len(a.calls(CHAT))

    # Well beyond the 1 s trial interval, well within the 60 s window: the trial must reach A.
    answers: list[httpx2.Response] = []

    def trial_reached_a() -> bool:
        answers.append(post(client, nexus, same))
        assert answers[-1].status_code == 200, answers[-1].text
        return len(a.calls(CHAT)) > tried

    assert wait_for(trial_reached_a, timeout=10), "no request was let through to A"
    assert served_by(answers[-1]) == "a"
    assert reason(answers[-1]) == "trial"
    assert served_by(post(client, nexus)) == "a"  # a new conversation: A is back


# --- 7. affinity ------------------------------------------------------------------------------


def conversation(turns: int) -> Messages:
    """A conversation with a system prompt, ``turns`` user turns and the replies between them."""
    messages: Messages = [
        {"role": "system", "content": "You are a terse assistant."},
        {"role": "user", "content": "Name a prime number."},
    ]
    for turn in range(1, turns):
        messages.append({"role": "assistant", "content": f"answer {turn}"})
        messages.append({"role": "user", "content": f"And another one? ({turn})"})
    return messages


def test_next_turns_go_back_to_the_backend_that_served_the_conversation(gated, start_nexus):
    fakes = {"one": gated(), "two": gated()}
    nexus = start_nexus(settings_for(backends=[backend(n, f.url, 50) for n, f in fakes.items()]))
    with httpx2.Client(timeout=30) as http:
        first = post(http, nexus, conversation(1))
        x = served_by(first)
        y = "two" if x == "one" else "one"
        assert reason(first) == "highest-score"

        # Turn 2 stays in flight on X: X is now the busier backend, Y would normally win.
        turn2_messages = conversation(2)
        turn2_messages[-1]["content"] += " " + HOLD
        turn2 = InBackground(lambda h: post(h, nexus, turn2_messages))
        assert wait_for(lambda: len(fakes[x].calls(CHAT)) == 2), "turn 2 did not reach X"
        assert state(nexus, x).in_flight == 1

        other = post(http, nexus, fresh("another conversation"))
        assert served_by(other) == y
        assert reason(other) == "highest-score"

        for turns in (3, 4):
            for stream in (False, True):
                resp = post(http, nexus, conversation(turns), stream=stream)
                assert served_by(resp) == x
                assert reason(resp) == "affinity"

        fakes[x].release.set()
        held = turn2.result()
        assert served_by(held) == x
        assert reason(held) == "affinity"
    assert len(fakes[y].calls(CHAT)) == 1


def test_affinity_off_never_routes_by_affinity(start_fake, start_nexus, client):
    one, two = start_fake(FakeOpenAI()), start_fake(FakeOpenAI())
    nexus = start_nexus(
        settings_for(
            backends=[backend("one", one.url, 50), backend("two", two.url, 50)],
            routing={"affinity": False},
        )
    )

    reasons = [reason(post(client, nexus, conversation(turns))) for turns in (1, 2, 3, 4, 5)]

    assert "affinity" not in reasons
    assert set(reasons) == {"highest-score"}


# --- 8. strategies ----------------------------------------------------------------------------


def test_round_robin_alternates(start_fake, start_nexus, client):
    one, two = start_fake(FakeOpenAI()), start_fake(FakeOpenAI())
    nexus = start_nexus(
        settings_for(
            # Very different priorities: round robin ignores them.
            backends=[backend("one", one.url, 1), backend("two", two.url, 90)],
            routing={"strategy": "round_robin"},
        )
    )

    names = []
    for index in range(6):
        resp = post(client, nexus, stream=index % 3 == 2)
        assert reason(resp) == "round-robin"
        names.append(served_by(resp))

    assert all(a != b for a, b in itertools.pairwise(names)), names
    assert len(one.calls(CHAT)) == len(two.calls(CHAT)) == 3


def test_priority_only_picks_the_lowest_priority_number_even_when_busy(gated, start_nexus):
    preferred, spare = gated(), gated()
    nexus = start_nexus(
        settings_for(
            # Named so that name order and priority order disagree.
            backends=[backend("alpha", spare.url, 5), backend("beta", preferred.url, 1)],
            routing={"strategy": "priority_only"},
        )
    )
    with httpx2.Client(timeout=30) as http:
        for stream in (False, True):
            resp = post(http, nexus, stream=stream)
            assert served_by(resp) == "beta"
            assert reason(resp) == "priority"

        # Busy with a held request, beta still comes first (smart would now prefer alpha).
        held = InBackground(lambda h: post(h, nexus, user(f"busy {HOLD}")))
        assert wait_for(lambda: len(preferred.calls(CHAT)) == 3)
        for _ in range(3):
            resp = post(http, nexus)
            assert served_by(resp) == "beta"
            assert reason(resp) == "priority"
        preferred.release.set()
        assert served_by(held.result()) == "beta"
    assert spare.calls(CHAT) == []
