"""Exception handlers: every error, ours or the framework's, leaves as an OpenAI envelope."""

from __future__ import annotations

import logging

import orjson
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response

from ..errors import (
    InternalError,
    MethodNotAllowed,
    NexusError,
    NotFound,
    PayloadTooLarge,
    error_envelope,
)

log = logging.getLogger("nexus.api")


def render(exc: NexusError) -> Response:
    return Response(
        exc.body(),
        status_code=exc.status_code,
        headers=exc.all_headers(),
        media_type="application/json",
    )


async def nexus_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, NexusError)
    return render(exc)


async def http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    if exc.status_code == 404:
        return render(NotFound(f"Unknown path: {request.method} {request.url.path}"))
    if exc.status_code == 405:
        allow = (exc.headers or {}).get("Allow", "")
        return render(
            MethodNotAllowed(f"Method {request.method} is not allowed on {request.url.path}", allow)
        )
    if exc.status_code == 413:
        return render(PayloadTooLarge("Request body is too large"))
    kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
    body = orjson.dumps(error_envelope(exc.detail, kind, None))
    return Response(body, status_code=exc.status_code, media_type="application/json")


async def unexpected_error(request: Request, exc: Exception) -> Response:
    log.error("unexpected error on %s %s", request.method, request.url.path, exc_info=exc)
    return render(InternalError("Internal error in Nexus; the log has the details"))


HANDLERS = {NexusError: nexus_error, HTTPException: http_error, Exception: unexpected_error}
