"""SSE relay: event for event, always ending in [DONE], headers first, idle timeout, failures
mid-stream, and a client that leaves (issue 8)."""

from __future__ import annotations

import socket
from typing import Any

import httpx2
import openai
import orjson
import pytest

from tests.fakes import DONE, FakeOpenAI, Reply, chunk, sse, text_stream
from tests.harness import settings_for, wait_for

CHAT = "/v1/chat/completions"
STREAM_BODY = {
    "model": "mock-model",
    "messages": [{"role": "user", "content": "hi"}],
    "stream": True,
}
GUARD = httpx2.Timeout(10.0)  # a hang fails the test instead of blocking it


def split_events(raw: bytes) -> list[bytes]:
    """The client's byte stream cut into SSE events, each kept with its blank-line terminator."""
    assert raw.endswith(b"\n\n"), raw[-200:]
    return [part + b"\n\n" for part in raw[:-2].split(b"\n\n")]


def data_of(event: bytes) -> Any:
    assert event.startswith(b"data: "), event
    return orjson.loads(event[len(b"data: ") :])


def stream_all(client: httpx2.Client, url: str, body: dict[str, Any] | None = None) -> Any:
    resp = client.post(url + CHAT, json=body or STREAM_BODY, timeout=GUARD)
    assert resp.status_code == 200, resp.text
    return resp


def one_backend(start_fake, start_nexus, *replies: Reply, **sections: Any):
    fake = start_fake(FakeOpenAI())
    fake.push(CHAT, *replies)
    nexus = start_nexus(settings_for(("vllm-1", fake, "vllm"), **sections))
    return fake, nexus


# --- event for event ------------------------------------------------------------------------


def test_n_events_in_same_n_out_in_order(start_fake, start_nexus, client):
    events = text_stream([f"word{i} " for i in range(25)])
    fake, nexus = one_backend(start_fake, start_nexus, Reply(events=events))

    resp = stream_all(client, nexus.url)

    assert split_events(resp.content) == events
    assert len(fake.calls(CHAT)) == 1


def test_events_split_across_writes_are_relayed_whole(start_fake, start_nexus, client):
    events = text_stream(["alpha", "beta", "gamma"])
    joined = b"".join(events)
    pieces = [joined[i : i + 7] for i in range(0, len(joined), 7)]  # boundaries mid-event
    fake, nexus = one_backend(start_fake, start_nexus, Reply(events=pieces))

    resp = stream_all(client, nexus.url)

    assert split_events(resp.content) == events


def test_done_ends_the_stream_even_when_upstream_omits_it(start_fake, start_nexus, client):
    events = text_stream(["no", " terminator"])[:-1]
    assert DONE not in events
    fake, nexus = one_backend(start_fake, start_nexus, Reply(events=events))

    resp = stream_all(client, nexus.url)

    assert split_events(resp.content) == [*events, DONE]


def test_nothing_after_done_is_relayed(start_fake, start_nexus, client):
    events = text_stream(["a", "b"])
    trailing = sse(chunk(content="after the end"))
    fake, nexus = one_backend(start_fake, start_nexus, Reply(events=[*events, trailing]))

    resp = stream_all(client, nexus.url)

    out = split_events(resp.content)
    assert out == events
    assert out.count(DONE) == 1


def test_usage_chunk_passes_through(start_fake, start_nexus, client):
    usage = {"prompt_tokens": 11, "completion_tokens": 3, "total_tokens": 14}
    usage_chunk = {**chunk(), "choices": [], "usage": usage}
    events = text_stream(["one", "two", "three"])
    events = [*events[:-1], sse(usage_chunk), DONE]
    fake, nexus = one_backend(start_fake, start_nexus, Reply(events=events))
    body = {**STREAM_BODY, "stream_options": {"include_usage": True}}

    resp = stream_all(client, nexus.url, body)

    out = split_events(resp.content)
    assert out == events
    assert data_of(out[-2])["usage"] == usage
    assert fake.calls(CHAT)[0].json["stream_options"] == {"include_usage": True}


# --- tool calls -----------------------------------------------------------------------------

WEATHER_ARGS = '{"city": "Zürich", "unit": "celsius"}'
TIME_ARGS = '{"tz": "Europe/Zurich"}'


def tool_call_events() -> list[bytes]:
    """Two tool calls, one after the other, their arguments cut into fragments mid-token."""

    def call_delta(index: int, **fields: Any) -> bytes:
        return sse(chunk(tool_calls=[{"index": index, **fields}]))

    def start(index: int, call_id: str, name: str) -> bytes:
        function = {"name": name, "arguments": ""}
        return call_delta(index, id=call_id, type="function", function=function)

    def args(index: int, fragment: str) -> bytes:
        return call_delta(index, function={"arguments": fragment})

    final = chunk()
    final["choices"][0]["finish_reason"] = "tool_calls"
    return [
        sse(chunk(role="assistant", content=None)),
        start(0, "call_w", "get_weather"),
        args(0, WEATHER_ARGS[:9]),
        args(0, WEATHER_ARGS[9:20]),
        args(0, WEATHER_ARGS[20:]),
        start(1, "call_t", "get_time"),
        args(1, TIME_ARGS[:5]),
        args(1, TIME_ARGS[5:]),
        sse(final),
        DONE,
    ]


TOOLS = [
    {
        "type": "function",
        "function": {
            "name": name,
            "parameters": {
                "type": "object",
                "properties": {key: {"type": "string"} for key in keys},
                "required": keys,
                "additionalProperties": False,
            },
            "strict": True,
        },
    }
    for name, keys in (("get_weather", ["city", "unit"]), ("get_time", ["tz"]))
]


def test_tool_call_argument_deltas_are_intact(start_fake, start_nexus, client):
    events = tool_call_events()
    fake, nexus = one_backend(start_fake, start_nexus, Reply(events=events))

    resp = stream_all(client, nexus.url, {**STREAM_BODY, "tools": TOOLS})

    out = split_events(resp.content)
    assert out == events
    fragments: dict[int, str] = {0: "", 1: ""}
    for event in out[:-1]:
        for call in data_of(event)["choices"][0]["delta"].get("tool_calls") or ():
            fragments[call["index"]] += call["function"].get("arguments", "")
    assert fragments == {0: WEATHER_ARGS, 1: TIME_ARGS}


def test_openai_sdk_reassembles_tool_calls_from_the_stream(start_fake, start_nexus):
    fake, nexus = one_backend(start_fake, start_nexus, Reply(events=tool_call_events()))

    sdk = openai.OpenAI(base_url=nexus.url + "/v1", api_key="x", max_retries=0, timeout=10)
    with (
        sdk,
        sdk.chat.completions.stream(
            model="mock-model",
            messages=[{"role": "user", "content": "weather and time?"}],
            tools=TOOLS,  # type: ignore[arg-type]
        ) as stream,
    ):
        final = stream.get_final_completion()

    choice = final.choices[0]
    assert choice.finish_reason == "tool_calls"
    calls = choice.message.tool_calls or []
    assert [(c.id, c.function.name, c.function.arguments) for c in calls] == [
        ("call_w", "get_weather", WEATHER_ARGS),
        ("call_t", "get_time", TIME_ARGS),
    ]
    assert fake.calls(CHAT)[0].json["stream"] is True


# --- headers ----------------------------------------------------------------------------------


def test_headers_arrive_with_the_first_event(start_fake, start_nexus, client):
    # The upstream sends one event, then stays silent: the headers must not wait for more.
    # (Before its first event a stream is not committed: see test_stream_commit.py.)
    events = text_stream(["first", "never sent"])
    fake, nexus = one_backend(start_fake, start_nexus, Reply(events=events, hang_after=1))

    with client.stream("POST", nexus.url + CHAT, json=STREAM_BODY, timeout=GUARD) as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        assert resp.headers["x-accel-buffering"] == "no"
        assert resp.headers["x-nexus-backend"] == "vllm-1"
        assert resp.headers["x-nexus-backend-type"] == "local"
        assert resp.headers["x-nexus-route-reason"]
        assert resp.headers["x-request-id"]

    assert fake.wait_disconnect(timeout=5.0)


# --- timeouts and failures ---------------------------------------------------------------------


def test_idle_timeout_ends_a_stalled_stream_with_error_then_done(start_fake, start_nexus, client):
    events = text_stream(["a", "b", "c"])
    fake, nexus = one_backend(
        start_fake,
        start_nexus,
        Reply(events=events, hang_after=2),
        server={"stream_idle_timeout_seconds": 0.5},
    )

    resp = stream_all(client, nexus.url)

    assert_error_then_done(split_events(resp.content), events[:2])
    assert wait_for(lambda: nexus.gateway.registry.get("vllm-1").in_flight == 0)


def test_silence_before_the_first_event_is_bounded_by_the_request_timeout(
    start_fake, start_nexus, client
):
    # Headers, then nothing: the stream has not started, so with no other backend to try the
    # client gets a 504 envelope, not a started stream. The idle timeout (far longer here)
    # counts only after the first event.
    fake, nexus = one_backend(
        start_fake,
        start_nexus,
        Reply(events=text_stream(["x"]), hang_after=0),
        server={"request_timeout_seconds": 0.5, "stream_idle_timeout_seconds": 60},
    )

    resp = client.post(nexus.url + CHAT, json=STREAM_BODY, timeout=GUARD)

    assert resp.status_code == 504
    assert resp.headers["content-type"].startswith("application/json")
    assert resp.json()["error"]["code"] == "gateway_timeout"
    assert fake.wait_disconnect(timeout=5.0)
    assert wait_for(lambda: nexus.gateway.registry.get("vllm-1").in_flight == 0)


def test_idle_timeout_is_not_a_total_timeout(start_fake, start_nexus, client):
    # 8 events 0.2 s apart: each gap is within the idle timeout, the total is three times it
    events = text_stream(["one", "two", "three", "four", "five"])
    fake, nexus = one_backend(
        start_fake,
        start_nexus,
        Reply(events=events, event_delay=0.2),
        server={"stream_idle_timeout_seconds": 0.5},
    )

    resp = stream_all(client, nexus.url)

    assert split_events(resp.content) == events


def assert_error_then_done(out: list[bytes], sent: list[bytes]) -> None:
    """``out`` is the events ``sent`` before the failure, one error event, then [DONE]."""
    assert out[: len(sent)] == sent
    assert len(out) == len(sent) + 2, out
    error = data_of(out[-2])["error"]
    assert isinstance(error, dict)
    assert {"message", "type", "code"} <= set(error)
    assert out[-1] == DONE


def test_mid_stream_drop_ends_with_error_event_and_done(start_fake, start_nexus, client):
    events = text_stream(["a", "b", "c", "d"])
    fake, nexus = one_backend(
        start_fake, start_nexus, Reply(events=events, drop_after=2, event_delay=0.05)
    )

    resp = stream_all(client, nexus.url)

    assert_error_then_done(split_events(resp.content), events[:2])
    assert wait_for(lambda: nexus.gateway.registry.get("vllm-1").in_flight == 0)


def test_events_that_arrived_just_before_a_drop_are_not_lost(start_fake, start_nexus, client):
    # The upstream writes two events and closes at once: Nexus has both events' bytes in hand
    # when it learns of the failure, and must relay them before the error event.
    events = text_stream(["a", "b", "c", "d"])
    fake, nexus = one_backend(start_fake, start_nexus, Reply(events=events, drop_after=2))

    resp = stream_all(client, nexus.url)

    assert_error_then_done(split_events(resp.content), events[:2])


# --- the client leaves -------------------------------------------------------------------------


def test_client_disconnect_closes_upstream_and_releases_in_flight(start_fake, start_nexus, client):
    events = text_stream(["first", "never"])
    fake, nexus = one_backend(start_fake, start_nexus, Reply(events=events, hang_after=1))
    backend = nexus.gateway.registry.get("vllm-1")

    with client.stream("POST", nexus.url + CHAT, json=STREAM_BODY, timeout=GUARD) as resp:
        assert resp.status_code == 200
        received = b""
        pieces = resp.iter_raw()  # held: dropping the iterator would close the response early
        while b"\n\n" not in received:
            received += next(pieces)
        assert split_events(received) == events[:1]
        assert backend.in_flight == 1
    # leaving the block closes the half-read response, and with it the connection

    assert fake.wait_disconnect(timeout=1.0), "upstream still open 1 s after the client left"
    assert wait_for(lambda: backend.in_flight == 0), f"in_flight stuck at {backend.in_flight}"


@pytest.mark.parametrize(
    "reply",
    [
        Reply(events=text_stream(["late"]), delay=60),
        Reply(events=text_stream(["late"]), hang_after=0),
    ],
    ids=["before-headers", "before-first-event"],
)
def test_client_leaving_before_the_stream_started_closes_upstream_too(
    start_fake, start_nexus, reply
):
    # A long prompt: the backend has the request but has not sent an event yet (nor, maybe, its
    # headers) when the client leaves; Nexus has not answered the client at all.
    fake, nexus = one_backend(start_fake, start_nexus, reply)
    backend = nexus.gateway.registry.get("vllm-1")
    body = orjson.dumps(STREAM_BODY)
    head = (
        f"POST {CHAT} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()

    with socket.create_connection(("127.0.0.1", nexus.port), timeout=10) as sock:
        sock.sendall(head + body)
        assert wait_for(lambda: len(fake.calls(CHAT)) == 1), "request never reached the backend"
        assert backend.in_flight == 1

    assert fake.wait_disconnect(timeout=1.0), "upstream still open 1 s after the client left"
    assert wait_for(lambda: backend.in_flight == 0), f"in_flight stuck at {backend.in_flight}"


# --- accounting ---------------------------------------------------------------------------------


def test_a_response_start_that_fails_still_releases_the_slot(start_fake, start_nexus, client):
    # Backend names are checked at config, admin and mDNS time; this is the line behind that:
    # whatever makes the server refuse the response's start (here a name that is not a valid
    # header value), the backend's slot comes back. (uvicorn has committed to the response by
    # then and can only close the connection.)
    fake, nexus = one_backend(start_fake, start_nexus, Reply(events=text_stream(["x"])))
    backend = nexus.gateway.registry.get("vllm-1")
    backend.name = "bad\nname"

    with pytest.raises(httpx2.RemoteProtocolError):
        client.post(nexus.url + CHAT, json=STREAM_BODY, timeout=GUARD)

    assert len(fake.calls(CHAT)) == 1
    assert wait_for(lambda: backend.in_flight == 0), f"in_flight stuck at {backend.in_flight}"
