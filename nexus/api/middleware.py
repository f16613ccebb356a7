"""Pure ASGI middleware: every answer carries ``X-Request-Id`` (the client's, or a new one)."""

from __future__ import annotations

import os
import re

from starlette.types import ASGIApp, Message, Receive, Scope, Send

REQUEST_ID_KEY = "nexus.request_id"
_SAFE_ID = re.compile(rb"^[A-Za-z0-9._:@/+=-]{1,128}$")


class RequestIdMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = b""
        for name, value in scope["headers"]:
            if name == b"x-request-id":
                request_id = value
                break
        if not _SAFE_ID.match(request_id):
            request_id = os.urandom(16).hex().encode()
        scope[REQUEST_ID_KEY] = request_id.decode()

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", ()), (b"x-request-id", request_id)]
            await send(message)

        await self.app(scope, receive, send_with_id)
