"""Sending a relayed SSE stream to the client, and noticing at once when the client leaves.

The client's disconnect is watched for concurrently with the relay, so a stream whose backend is
silent (a long prompt, a slow model) is still torn down within moments of the client going away:
the upstream connection is closed and the backend's in-flight slot released.
"""

from __future__ import annotations

import asyncio
import contextlib

from starlette.types import Receive, Send

from ..dispatch import StreamResult

SSE_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]


async def send_stream(receive: Receive, send: Send, result: StreamResult) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [*SSE_HEADERS, *result.served.headers()],
        }
    )
    pump = asyncio.ensure_future(_pump(send, result))
    watch = asyncio.ensure_future(_wait_for_disconnect(receive))
    try:
        await asyncio.wait((pump, watch), return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (pump, watch):
            task.cancel()
        await asyncio.gather(pump, watch, return_exceptions=True)
        await result.events.aclose()


async def _pump(send: Send, result: StreamResult) -> None:
    with contextlib.suppress(OSError):  # the client went away mid-write
        async for event in result.events:
            await send({"type": "http.response.body", "body": event, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})


async def _wait_for_disconnect(receive: Receive) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
