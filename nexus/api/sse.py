"""Sending a relayed SSE stream to the client.

The caller runs this inside a ``DisconnectGuard``: if the client leaves, the task is cancelled
wherever it waits, and the relay's clean-up closes the upstream and releases the backend's slot.
"""

from __future__ import annotations

from starlette.types import Send

from ..dispatch import StreamResult
from .http import ClientGone

SSE_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]


async def send_stream(send: Send, result: StreamResult) -> None:
    try:
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [*SSE_HEADERS, *result.served.headers()],
            }
        )
        async for event in result.events:
            await send({"type": "http.response.body", "body": event, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})
    except OSError:  # servers other than uvicorn raise when writing to a closed connection
        raise ClientGone from None
    finally:
        await result.events.aclose()
