"""Scriptable fake upstream servers (aiohttp, real sockets on loopback), one per dialect.

A fake records every request, answers from a script (status, delay, JSON or SSE events, pacing,
a drop mid-stream, a hang) and notices when its client goes away. The OpenAI fake speaks the
OpenAI-compatible dialect (vLLM, llama.cpp, ...), the Ollama fake speaks Ollama's native API.
"""

from __future__ import annotations

import asyncio
import ssl
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web


@dataclass
class Reply:
    """One scripted answer. With ``events`` the answer is an SSE (or NDJSON) stream."""

    status: int = 200
    json: Any = None
    body: bytes | None = None
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0  # before the status line
    events: list[bytes] | None = None  # raw bytes written one by one
    event_delay: float = 0.0  # between events
    drop_after: int | None = None  # close the connection after this many events
    hang_after: int | None = None  # after this many events, send nothing more, ever
    content_type: str = "text/event-stream"


@dataclass
class Recorded:
    method: str
    path: str
    headers: dict[str, str]
    raw: bytes

    @property
    def json(self) -> Any:
        return orjson.loads(self.raw) if self.raw else None


def sse(obj: Any) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"


DONE = b"data: [DONE]\n\n"


def completion(model: str = "mock-model", content: str = "Hello!", **extra: Any) -> dict[str, Any]:
    return {
        "id": "chatcmpl-fake",
        "object": "chat.completion",
        "created": 1700000000,
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": content, "refusal": None},
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7},
        **extra,
    }


def chunk(model: str = "mock-model", **delta: Any) -> dict[str, Any]:
    return {
        "id": "chatcmpl-fake",
        "object": "chat.completion.chunk",
        "created": 1700000000,
        "model": model,
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": None}],
    }


def text_stream(words: list[str], model: str = "mock-model") -> list[bytes]:
    events = [sse(chunk(model, role="assistant", content=""))]
    events += [sse(chunk(model, content=word)) for word in words]
    final = chunk(model)
    final["choices"][0]["finish_reason"] = "stop"
    return [*events, sse(final), DONE]


class FakeUpstream:
    """Base: a scripted aiohttp server. Subclasses add the dialect's routes and defaults."""

    def __init__(self, models: list[str] | None = None) -> None:
        self.models = list(models or ["mock-model"])
        self.requests: list[Recorded] = []
        self.script: dict[str, deque[Reply]] = {}
        self.disconnects = threading.Semaphore(0)  # released once per client that went away
        self.disconnected_at: list[float] = []
        self.port = 0
        self.runner: web.AppRunner | None = None
        self.tls: ssl.SSLContext | None = None  # set before start to serve https

    # --- scripting -------------------------------------------------------------------------
    def push(self, path: str, *replies: Reply) -> None:
        """Answer the next requests to ``path`` with ``replies``, in order, then the default."""
        self.script.setdefault(path, deque()).extend(replies)

    def calls(self, path: str) -> list[Recorded]:
        return [r for r in self.requests if r.path == path]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait_disconnect(self, timeout: float) -> bool:
        return self.disconnects.acquire(timeout=timeout)

    # --- serving ---------------------------------------------------------------------------
    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        return app

    async def start(self) -> None:
        self.runner = web.AppRunner(self.app(), handler_cancellation=True, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", self.port, ssl_context=self.tls)
        await site.start()
        server = site._server
        assert server is not None and server.sockets  # type: ignore[attr-defined]
        self.port = server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        self.requests.append(Recorded(request.method, request.path, dict(request.headers), raw))
        queue = self.script.get(request.path)
        reply = queue.popleft() if queue else self.default(request.method, request.path, raw)
        if reply is None:
            return web.json_response({"error": "not found"}, status=404)
        return await self._answer(request, reply)

    def default(self, method: str, path: str, raw: bytes) -> Reply | None:
        raise NotImplementedError

    async def _answer(self, request: web.Request, reply: Reply) -> web.StreamResponse:
        try:
            if reply.delay:
                await asyncio.sleep(reply.delay)
            if reply.events is None:
                body = reply.body if reply.body is not None else orjson.dumps(reply.json)
                return web.Response(
                    body=body,
                    status=reply.status,
                    headers={"Content-Type": "application/json", **reply.headers},
                )
            return await self._stream(request, reply)
        except (asyncio.CancelledError, ConnectionResetError):
            self.disconnected_at.append(time.monotonic())
            self.disconnects.release()
            raise

    async def _stream(self, request: web.Request, reply: Reply) -> web.StreamResponse:
        resp = web.StreamResponse(
            status=reply.status, headers={"Content-Type": reply.content_type, **reply.headers}
        )
        await resp.prepare(request)
        for index, event in enumerate(reply.events or ()):
            if reply.hang_after is not None and index >= reply.hang_after:
                await asyncio.sleep(3600)
            if reply.drop_after is not None and index >= reply.drop_after:
                assert request.transport is not None
                request.transport.close()
                return resp
            await resp.write(event)
            if reply.event_delay:
                await asyncio.sleep(reply.event_delay)
        if reply.hang_after is not None and reply.hang_after >= len(reply.events or ()):
            await asyncio.sleep(3600)
        await resp.write_eof()
        return resp


class FakeOpenAI(FakeUpstream):
    """vLLM / llama.cpp / any OpenAI-compatible server."""

    def __init__(self, models: list[str] | None = None, **model_fields: Any) -> None:
        super().__init__(models)
        self.model_fields = model_fields  # extra keys per /v1/models entry, e.g. max_model_len

    def default(self, method: str, path: str, raw: bytes) -> Reply | None:
        if path == "/v1/models":
            data = [
                {"id": m, "object": "model", "created": 0, "owned_by": "fake", **self.model_fields}
                for m in self.models
            ]
            return Reply(json={"object": "list", "data": data})
        body = orjson.loads(raw) if raw else {}
        model = body.get("model", "mock-model")
        if path == "/v1/chat/completions":
            if body.get("stream"):
                return Reply(events=text_stream(["Hello", " there", "!"], model))
            return Reply(json=completion(model))
        if path == "/v1/embeddings":
            inputs = body.get("input")
            items = [inputs] if isinstance(inputs, str) else list(inputs or [])
            data = [
                {"object": "embedding", "index": i, "embedding": [0.1, 0.2, float(i)]}
                for i, _ in enumerate(items)
            ]
            usage = {"prompt_tokens": 3 * len(items), "total_tokens": 3 * len(items)}
            return Reply(json={"object": "list", "data": data, "model": model, "usage": usage})
        return None


class FakeOllama(FakeUpstream):
    """Ollama's native API: /api/tags, /api/show, /api/chat (NDJSON), /api/embed."""

    def __init__(
        self,
        models: list[str] | None = None,
        capabilities: list[str] | None = None,
        context_length: int = 8192,
    ) -> None:
        super().__init__(models or ["llama3.2:latest"])
        self.capabilities = capabilities or ["completion", "tools"]
        self.context_length = context_length

    def default(self, method: str, path: str, raw: bytes) -> Reply | None:
        body = orjson.loads(raw) if raw else {}
        if path == "/api/tags":
            models = [{"name": m, "model": m, "digest": f"sha-{m}"} for m in self.models]
            return Reply(json={"models": models})
        if path == "/api/show":
            return Reply(
                json={
                    "capabilities": self.capabilities,
                    "model_info": {"llama.context_length": self.context_length},
                }
            )
        if path == "/api/chat":
            model = body.get("model")
            if body.get("stream", True):
                lines = [
                    {"model": model, "message": {"role": "assistant", "content": w}, "done": False}
                    for w in ["Hel", "lo"]
                ]
                last = {
                    "model": model,
                    "message": {"role": "assistant", "content": ""},
                    "done": True,
                    "done_reason": "stop",
                    "prompt_eval_count": 4,
                    "eval_count": 2,
                }
                events = [orjson.dumps(line) + b"\n" for line in [*lines, last]]
                return Reply(events=events, content_type="application/x-ndjson")
            return Reply(
                json={
                    "model": model,
                    "message": {"role": "assistant", "content": "Hello"},
                    "done": True,
                    "done_reason": "stop",
                    "prompt_eval_count": 4,
                    "eval_count": 2,
                }
            )
        if path == "/api/embed":
            inputs = body.get("input")
            items = [inputs] if isinstance(inputs, str) else list(inputs or [])
            vectors = [[0.5, -0.5, float(i)] for i, _ in enumerate(items)]
            return Reply(
                json={"model": body.get("model"), "embeddings": vectors, "prompt_eval_count": 6}
            )
        return None
