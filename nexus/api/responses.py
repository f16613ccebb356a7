"""The OpenAI Responses API (``POST /v1/responses``) in front of every backend, for clients such
as Codex CLI.

A request is translated to the internal chat form (``dialects/responses``) and goes through the
same planner, dispatcher, failover and telemetry as ``/v1/chat/completions``; the answer comes
back as a Response object, streams as Responses' typed events. Hosted tools the backend cannot
run (``web_search``...) are left out and named in ``X-Nexus-Dropped-Tools``.

``previous_response_id`` works within one process: the last responses (with ``store`` not false)
are kept in memory, bounded in count and size, and lost on restart; an id Nexus does not hold is
a 404.
"""

from __future__ import annotations

import os
import time
from collections import OrderedDict
from collections.abc import AsyncGenerator
from typing import Any

import orjson
from starlette.types import Receive, Scope, Send

from ..dialects import responses as dialect
from ..dispatch import Inbound, StreamResult
from ..errors import JSONDict, NotFound
from .disconnect import DisconnectGuard
from .http import client_headers, parse_object, read_body, send_json
from .messages import dropped_header, take_effort
from .middleware import REQUEST_ID_KEY, trace_of
from .openai import gateway_of
from .sse import send_stream, translated

MAX_STORED = 1000  # responses kept for previous_response_id
MAX_STORED_BYTES = 64 * 1024 * 1024  # and their conversations' size, together


class ResponseStore:
    """The last responses' conversations (items), oldest dropped first when either bound is hit."""

    def __init__(self, max_items: int = MAX_STORED, max_bytes: int = MAX_STORED_BYTES) -> None:
        self.max_items = max_items
        self.max_bytes = max_bytes
        self.size = 0
        self._items: OrderedDict[str, tuple[list[JSONDict], int]] = OrderedDict()

    def get(self, response_id: str) -> list[JSONDict] | None:
        found = self._items.get(response_id)
        return None if found is None else found[0]

    def put(self, response_id: str, conversation: list[JSONDict]) -> None:
        size = len(orjson.dumps(conversation))
        if size > self.max_bytes:
            return  # larger than the whole store: not kept (a later turn gets a 404)
        self._items[response_id] = (conversation, size)
        self.size += size
        while len(self._items) > self.max_items or self.size > self.max_bytes:
            _, (_, dropped) = self._items.popitem(last=False)
            self.size -= dropped

    def __len__(self) -> int:
        return len(self._items)


class PreviousResponseNotFound(NotFound):
    code = "previous_response_not_found"

    def __init__(self, response_id: str) -> None:
        super().__init__(
            f"Previous response with id '{response_id[:100]}' not found (Nexus keeps the last "
            f"{MAX_STORED} responses in memory, until it restarts)",
            param="previous_response_id",
        )


class Responses:
    """``POST /v1/responses``, streaming and not."""

    def __init__(self, store: ResponseStore | None = None) -> None:
        self.store = store or ResponseStore()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        trace = trace_of(scope)
        trace.api = "responses"
        body = parse_object(await read_body(scope, receive))
        history: list[JSONDict] | None = None
        previous = body.get("previous_response_id")
        if previous is not None:
            if not isinstance(previous, str) or self.store.get(previous) is None:
                raise PreviousResponseNotFound(str(previous))
            history = self.store.get(previous)
        request = dialect.chat_request(body, history)
        chat = request.body
        inbound = Inbound(reasoning_effort=take_effort(chat))
        dispatcher = gateway_of(scope).dispatcher
        headers = client_headers(scope)
        request_id: str = scope[REQUEST_ID_KEY]
        dropped = dropped_header(request.dropped_tools)
        response_id = "resp_" + os.urandom(24).hex()
        created = int(time.time())
        keep = body.get("store") is not False
        conversation = [*(history or ()), *request.input_items]
        chat_raw = orjson.dumps(chat)
        async with DisconnectGuard(receive, send) as guard:
            if chat.get("stream") is True:
                result = await dispatcher.stream(
                    chat, chat_raw, headers, request_id, trace, inbound
                )
                stream = dialect.ResponsesStream(body, response_id, created)
                saved = conversation if keep else None
                events = self._translated(result, stream, response_id, saved)
                await send_stream(
                    guard.send,
                    result,
                    events,
                    extra_headers=dropped,
                    failure=lambda exc: stream.fail(exc.envelope()["error"]),
                )
                return
            completion, served = await dispatcher.complete(
                "chat", chat, chat_raw, headers, request_id, trace, inbound
            )
            answer = dialect.response_object(
                orjson.loads(completion.body), body, response_id, created
            )
            if keep:
                self._remember(response_id, conversation, answer)
            await send_json(guard.send, 200, orjson.dumps(answer), [*served.headers(), *dropped])

    async def _translated(
        self,
        result: StreamResult,
        stream: dialect.ResponsesStream,
        response_id: str,
        conversation: list[JSONDict] | None,
    ) -> AsyncGenerator[bytes, None]:
        """The relay's OpenAI events as Responses events, the response kept once complete;
        closing this closes the relay."""
        events = translated(result.events, stream, stream.start())
        try:
            async for out in events:
                yield out
        finally:
            await events.aclose()  # now, not when collected: it frees the slot and upstream
        final = stream.final_response
        if conversation is not None and final is not None:
            self._remember(response_id, conversation, final)

    def _remember(self, response_id: str, conversation: list[JSONDict], answer: Any) -> None:
        self.store.put(response_id, [*conversation, *dialect.output_items(answer)])
