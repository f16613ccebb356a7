"""Noticing a client that leaves, whatever the request is waiting on.

While a handler waits on a backend (a long prompt, a slow model, a stream between two events),
``DisconnectGuard`` listens for ``http.disconnect``. When the client goes away first, the handler's
task is cancelled, which closes the upstream request (so the backend stops working) and releases
the backend's in-flight slot; the handler then ends quietly with ``ClientGone``.

ASGI servers also report ``http.disconnect`` once a response is complete; the guard tells the two
apart by watching the handler's own final ``send``.

Listening costs a task, which would add about a tenth of a millisecond to every request; so the
listener starts only once a request has taken ``WATCH_AFTER`` seconds. A client that left earlier
is still seen then, since the server keeps reporting the disconnect.
"""

from __future__ import annotations

import asyncio
from types import TracebackType

from starlette.types import Message, Receive, Send

from .http import ClientGone

WATCH_AFTER = 0.05


class DisconnectGuard:
    def __init__(self, receive: Receive, send: Send) -> None:
        self._receive = receive
        self._send = send
        self._finished = False
        self._gone = False
        self._task: asyncio.Task[object] | None = None
        self._watcher: asyncio.Task[None] | None = None
        self._timer: asyncio.TimerHandle | None = None

    async def __aenter__(self) -> DisconnectGuard:
        self._task = asyncio.current_task()
        self._timer = asyncio.get_running_loop().call_later(WATCH_AFTER, self._start_watching)
        return self

    def _start_watching(self) -> None:
        self._watcher = asyncio.get_running_loop().create_task(self._watch())

    async def send(self, message: Message) -> None:
        if message["type"] == "http.response.body" and not message.get("more_body", False):
            self._finished = True
        await self._send(message)

    async def _watch(self) -> None:
        while True:
            message = await self._receive()
            if message["type"] == "http.disconnect":
                break
        if not self._finished and self._task is not None:
            self._gone = True
            self._task.cancel()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if self._watcher is not None:
            self._watcher.cancel()
        if exc_type is asyncio.CancelledError and self._gone:
            assert self._task is not None
            if self._task.uncancel() == 0:  # the only cancellation was ours
                raise ClientGone from None
