"""A bare Starlette pass-through: the least a Python gateway can do, as a yardstick for Nexus.

Run: ``python bench/passthrough.py PORT UPSTREAM_URL`` (binds 127.0.0.1).

Every request goes to the same path upstream through Nexus's own HTTP/1.1 client (pooled
keep-alive, so the transport is the same as Nexus's), and the answer comes back as it arrives,
chunk by chunk: no routing, no checks, no parsing, no event splitting. It runs under uvicorn with
uvloop and httptools, no access log, like ``nexus serve``; scripts/bench pins it to the gateway's
CPU.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import AsyncIterator

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from nexus.backends.http1 import HTTP1Client

FORWARD = {"Content-Type": "application/json"}


def make_app(upstream: str) -> Starlette:
    client = HTTP1Client()

    async def forward(request: Request) -> Response:
        body = await request.body()
        url = upstream + request.url.path
        resp = await client.request(request.method, url, FORWARD, body)
        media = resp.headers.get("content-type", "application/json")
        if media.startswith("text/event-stream"):
            return StreamingResponse(resp.iter_chunks(), resp.status, media_type=media)
        return Response(await resp.read(), resp.status, media_type=media)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        await client.aclose()

    routes = [
        Route("/v1/chat/completions", forward, methods=["POST"]),
        Route("/v1/models", forward, methods=["GET"]),
    ]
    return Starlette(routes=routes, lifespan=lifespan)


def main() -> None:
    port, upstream = int(sys.argv[1]), sys.argv[2].rstrip("/")
    uvicorn.run(
        make_app(upstream),
        host="127.0.0.1",
        port=port,
        loop="uvloop",
        http="httptools",
        access_log=False,
        log_level="warning",
        server_header=False,
    )


if __name__ == "__main__":
    main()
