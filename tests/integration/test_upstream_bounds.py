"""Upstream answers are bounded and checked, and streams reuse connections (issue 8, points 4/5/9).

The upstream here is a raw asyncio server that writes exact bytes (statuses no HTTP library sends
willingly, drips, oversize answers, lone CRs) and counts the connections it accepts.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

import httpx2
import orjson
import pytest

from tests.fakes import DONE, FakeOpenAI, FakeUpstream, Recorded, completion, sse, text_stream
from tests.harness import data_events, settings_for, wait_for

CHAT = "/v1/chat/completions"
EMBED = "/v1/embeddings"
HELLO = [{"role": "user", "content": "hi"}]
BODIES = {
    "chat": (CHAT, {"model": "mock-model", "messages": HELLO}),
    "stream": (CHAT, {"model": "mock-model", "messages": HELLO, "stream": True}),
    "embeddings": (EMBED, {"model": "mock-model", "input": "hi"}),
}
GUARD = httpx2.Timeout(10.0)  # a hang fails the test instead of blocking it
MiB = 1024 * 1024

Reader = asyncio.StreamReader
Writer = asyncio.StreamWriter
Script = Callable[[Reader, Writer], Awaitable[bool]]  # answers one request; True: keep-alive


def response(status: bytes, body: bytes, *headers: bytes) -> bytes:
    head = [b"HTTP/1.1 " + status, b"Content-Length: %d" % len(body), *headers]
    return b"\r\n".join(head) + b"\r\n\r\n" + body


def json_response(obj: Any) -> bytes:
    return response(b"200 OK", orjson.dumps(obj), b"Content-Type: application/json")


STREAM_HEAD = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
)


def chunk_of(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


class RawUpstream(FakeUpstream):
    """An OpenAI-compatible (or Ollama) upstream on a raw socket. ``raw`` scripts answer the next
    requests to a path; otherwise a well-formed default answer is sent."""

    def __init__(self, dialect: str = "openai") -> None:
        super().__init__()
        self.dialect = dialect
        self.raw: dict[str, deque[Script]] = {}
        self.accepted = 0
        self.open = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

    def answer_with(self, path: str, *scripts: Script) -> None:
        self.raw.setdefault(path, deque()).extend(scripts)

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()

    async def _serve(self, reader: Reader, writer: Writer) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self.accepted += 1
        self.open += 1
        try:
            while (request := await read_request(reader)) is not None:
                method, path, body = request
                self.requests.append(Recorded(method, path, {}, body))
                queue = self.raw.get(path)
                if queue:
                    keep = await queue.popleft()(reader, writer)
                else:
                    writer.write(self.default_answer(path, body))
                    keep = True
                await writer.drain()
                if not keep:
                    break
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            pass
        finally:
            self.open -= 1
            writer.close()
            self._tasks.discard(task)

    def default_answer(self, path: str, body: bytes) -> bytes:
        if path == "/v1/models":
            return json_response({"object": "list", "data": [{"id": "mock-model"}]})
        if path == "/api/tags":
            return json_response({"models": [{"name": "llama3.2:latest", "digest": "x"}]})
        if path == "/api/show":
            return json_response({"capabilities": ["completion"]})
        request = orjson.loads(body)
        if path == "/api/chat":
            lines = [{"message": {"role": "assistant", "content": "Hi"}, "done": False}]
            lines.append({"message": {"content": ""}, "done": True, "done_reason": "stop"})
            events = [orjson.dumps(line) + b"\n" for line in lines]
            return STREAM_HEAD + b"".join(map(chunk_of, events)) + b"0\r\n\r\n"
        if path == CHAT and request.get("stream"):
            events = text_stream(["Hello", "!"])
            return STREAM_HEAD + b"".join(map(chunk_of, events)) + b"0\r\n\r\n"
        if path == CHAT:
            return json_response(completion())
        return json_response(
            {"object": "list", "data": [{"object": "embedding", "index": 0, "embedding": [0.5]}]}
        )


async def read_request(reader: Reader) -> tuple[str, str, bytes] | None:
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError:
        return None
    lines = head.split(b"\r\n")
    method, path, _ = lines[0].decode().split(" ", 2)
    length = 0
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    return method, path, await reader.readexactly(length)


async def until_eof(reader: Reader) -> None:
    with contextlib.suppress(ConnectionError):
        while await reader.read(65536):
            pass


def send(raw: bytes) -> Script:
    """Write ``raw``, then close the connection."""

    async def script(reader: Reader, writer: Writer) -> bool:
        writer.write(raw)
        return False

    return script


def send_then_hold(raw: bytes, gone: list[bool]) -> Script:
    """Write ``raw`` and send nothing more; note when the client closes the connection."""

    async def script(reader: Reader, writer: Writer) -> bool:
        writer.write(raw)
        await writer.drain()
        await until_eof(reader)
        gone.append(True)
        return False

    return script


def drip(first: bytes, trickle: bytes, gap: float, gone: list[bool]) -> Script:
    """A stream: one whole event, then ``trickle`` one byte at a time, ``gap`` seconds apart,
    never ending an event; stops when the client goes away."""

    async def script(reader: Reader, writer: Writer) -> bool:
        writer.write(STREAM_HEAD + chunk_of(first))
        eof = asyncio.ensure_future(until_eof(reader))
        try:
            for byte in trickle * 100:
                if eof.done():
                    break
                writer.write(chunk_of(bytes([byte])))
                await writer.drain()
                await asyncio.wait([eof], timeout=gap)
        except ConnectionError:
            pass
        finally:
            await eof
            gone.append(True)
        return False

    return script


def post(client: httpx2.Client, url: str, kind: str) -> httpx2.Response:
    path, body = BODIES[kind]
    return client.post(url + path, json=body, timeout=GUARD)


def assert_envelope(resp: httpx2.Response, status: int, code: str) -> str:
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].startswith("application/json")
    error = resp.json()["error"]
    assert {"message", "type", "param", "code"} <= set(error)
    assert error["code"] == code, error
    message: str = error["message"]
    return message


def assert_error_then_done(resp: httpx2.Response, code: str) -> tuple[list[str], str]:
    """A 200 stream that ends with one error event, then [DONE]; returns the events before the
    error and the error's message."""
    assert resp.status_code == 200, resp.text
    events = data_events(resp.text)
    assert events[-1] == "[DONE]"
    error = orjson.loads(events[-2])["error"]
    assert error["code"] == code, error
    return events[:-2], error["message"]


def first_event() -> bytes:
    return text_stream(["Hello"])[0]


@pytest.fixture
def raw(start_fake: Callable[[RawUpstream], RawUpstream]) -> RawUpstream:
    return start_fake(RawUpstream())


# --- sizes ----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["chat", "embeddings"])
def test_answer_past_max_response_bytes_is_a_502(raw, start_nexus, client, kind):
    path = BODIES[kind][0]
    big = orjson.dumps({"object": "list", "data": [], "pad": "x" * 8192})
    raw.answer_with(path, send(response(b"200 OK", big, b"Content-Type: application/json")))
    nexus = start_nexus(settings_for(("vllm-1", raw, "vllm"), server={"max_response_bytes": 4096}))

    message = assert_envelope(post(client, nexus.url, kind), 502, "bad_gateway")

    assert "max_response_bytes" in message
    assert wait_for(lambda: nexus.gateway.registry.get("vllm-1").in_flight == 0)


def test_stream_past_max_response_bytes_ends_with_an_error_event(raw, start_nexus, client):
    gone: list[bool] = []
    events = [sse({"n": i, "pad": "x" * 100}) for i in range(60)]  # ~7 KiB
    raw.answer_with(CHAT, send_then_hold(STREAM_HEAD + b"".join(map(chunk_of, events)), gone))
    nexus = start_nexus(settings_for(("vllm-1", raw, "vllm"), server={"max_response_bytes": 4096}))

    relayed, message = assert_error_then_done(post(client, nexus.url, "stream"), "bad_gateway")

    assert 0 < len(relayed) < len(events)
    assert "max_response_bytes" in message
    assert wait_for(lambda: bool(gone))  # the upstream saw its connection closed
    assert wait_for(lambda: nexus.gateway.registry.get("vllm-1").in_flight == 0)


def test_an_event_without_an_end_past_1_mib_ends_the_stream(raw, start_nexus, client):
    gone: list[bool] = []
    endless = b"data: " + b"x" * (MiB + 1024)  # no blank line, ever
    raw.answer_with(
        CHAT, send_then_hold(STREAM_HEAD + chunk_of(first_event()) + chunk_of(endless), gone)
    )
    nexus = start_nexus(settings_for(("vllm-1", raw, "vllm")))

    relayed, message = assert_error_then_done(post(client, nexus.url, "stream"), "bad_gateway")

    assert len(relayed) == 1
    assert "longer than 1048576 bytes" in message
    assert wait_for(lambda: bool(gone))


# --- the idle timeout counts events, not bytes -------------------------------------------------


def test_bytes_that_never_end_an_event_do_not_keep_a_stream_open(raw, start_nexus, client):
    gone: list[bool] = []
    raw.answer_with(CHAT, drip(first_event(), b'data: {"never": "ends"', 0.05, gone))
    nexus = start_nexus(
        settings_for(("vllm-1", raw, "vllm"), server={"stream_idle_timeout_seconds": 0.5})
    )

    relayed, message = assert_error_then_done(post(client, nexus.url, "stream"), "gateway_timeout")

    assert len(relayed) == 1
    assert "no whole event" in message
    assert wait_for(lambda: bool(gone))
    assert wait_for(lambda: nexus.gateway.registry.get("vllm-1").in_flight == 0)


def test_lone_cr_line_ends_are_split_into_events(raw, start_nexus, client):
    events = text_stream(["a", "b"])
    cr_events = [event.replace(b"\n", b"\r") for event in events]
    raw.answer_with(CHAT, send(STREAM_HEAD + b"".join(map(chunk_of, cr_events)) + b"0\r\n\r\n"))
    nexus = start_nexus(settings_for(("vllm-1", raw, "vllm")))

    resp = post(client, nexus.url, "stream")

    assert resp.status_code == 200
    assert resp.content == b"".join(events)


# --- statuses and bodies that are no answer ----------------------------------------------------

NO_ANSWERS = {
    "101": b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
    "204": b"HTTP/1.1 204 No Content\r\n\r\n",
    "302": response(
        b"302 Found",
        orjson.dumps(completion()),  # a body that would pass for an answer
        b"Location: http://127.0.0.1:1/v1/chat/completions",
        b"Content-Type: application/json",
    ),
}


@pytest.mark.parametrize("kind", sorted(BODIES))
@pytest.mark.parametrize("status", sorted(NO_ANSWERS))
def test_status_that_answers_nothing_is_a_502(raw, start_nexus, client, kind, status):
    raw.answer_with(BODIES[kind][0], send(NO_ANSWERS[status]))
    nexus = start_nexus(settings_for(("vllm-1", raw, "vllm")))

    message = assert_envelope(post(client, nexus.url, kind), 502, "bad_gateway")

    assert f"status {status}" in message
    assert wait_for(lambda: nexus.gateway.registry.get("vllm-1").in_flight == 0)


@pytest.mark.parametrize("kind", ["chat", "embeddings"])
def test_invalid_json_is_a_502(raw, start_nexus, client, kind):
    raw.answer_with(BODIES[kind][0], send(response(b"200 OK", b"not json{")))
    nexus = start_nexus(settings_for(("vllm-1", raw, "vllm")))

    message = assert_envelope(post(client, nexus.url, kind), 502, "bad_gateway")

    assert "invalid JSON" in message


BAD_ANSWERS = {
    "invalid-json": response(b"200 OK", b"not json{"),
    "204": NO_ANSWERS["204"],
    "302": NO_ANSWERS["302"],
}


BAD_CASES = [  # a stream's body is events, not one JSON document: no invalid-JSON case for it
    (kind, bad)
    for kind in sorted(BODIES)
    for bad in sorted(BAD_ANSWERS)
    if (kind, bad) != ("stream", "invalid-json")
]


@pytest.mark.parametrize(("kind", "bad"), BAD_CASES)
def test_a_bad_answer_moves_on_to_the_next_backend(raw, start_fake, start_nexus, client, kind, bad):
    raw.answer_with(BODIES[kind][0], send(BAD_ANSWERS[bad]))
    good = start_fake(FakeOpenAI())
    backends = [
        {"name": "bad", "url": raw.url, "type": "vllm", "priority": 1},
        {"name": "good", "url": good.url, "type": "vllm", "priority": 2},
    ]
    nexus = start_nexus(settings_for(backends=backends, routing={"strategy": "priority_only"}))

    resp = post(client, nexus.url, kind)

    assert resp.status_code == 200, resp.text
    assert resp.headers["x-nexus-backend"] == "good"
    assert len(raw.calls(BODIES[kind][0])) == 1


# --- connections: reuse after a clean stream, the cap ---------------------------------------------


@pytest.mark.parametrize("dialect", ["openai", "ollama"])
def test_streams_that_end_cleanly_reuse_their_upstream_connection(
    start_fake, start_nexus, client, dialect
):
    raw = start_fake(RawUpstream(dialect))
    kind = "vllm" if dialect == "openai" else "ollama"
    model = "mock-model" if dialect == "openai" else "llama3.2:latest"
    nexus = start_nexus(settings_for(("up", raw, kind)))
    body = {"model": model, "messages": HELLO, "stream": True}

    def one_stream() -> None:
        resp = client.post(nexus.url + CHAT, json=body, timeout=GUARD)
        assert resp.status_code == 200
        assert resp.content.endswith(DONE)

    one_stream()
    accepted = raw.accepted
    for _ in range(5):
        one_stream()

    assert raw.accepted == accepted
    assert raw.open == 1


def test_max_concurrent_requests_caps_upstream_connections(raw, start_nexus, client):
    gone: list[bool] = []
    raw.answer_with(CHAT, send_then_hold(STREAM_HEAD + chunk_of(first_event()), gone))
    nexus = start_nexus(
        settings_for(
            ("vllm-1", raw, "vllm"),
            server={"max_concurrent_requests": 1, "connect_timeout_seconds": 0.3},
        )
    )
    path, body = BODIES["stream"]

    with client.stream("POST", nexus.url + path, json=body, timeout=GUARD) as held:
        assert held.status_code == 200
        chunks = held.iter_bytes()
        assert next(chunks)  # the stream holds the only allowed connection
        busy = post(client, nexus.url, "chat")
        message = assert_envelope(busy, 503, "service_unavailable")
        assert busy.headers["retry-after"] == "1"
        assert "max_concurrent_requests" in message
        assert raw.open == 1

    assert wait_for(lambda: bool(gone))
    assert post(client, nexus.url, "chat").status_code == 200
    assert wait_for(lambda: nexus.gateway.registry.get("vllm-1").in_flight == 0)


def test_idle_upstream_connections_are_closed_without_another_request(raw, start_nexus, client):
    # This upstream never closes an idle connection itself; Nexus's keep-alive (4 s) must.
    nexus = start_nexus(settings_for(("vllm-1", raw, "vllm")))
    assert post(client, nexus.url, "chat").status_code == 200
    assert raw.open >= 1

    assert wait_for(lambda: raw.open == 0, timeout=15.0)
