"""A bare Starlette pass-through: the least a Python gateway can do, as a yardstick for Nexus.

Run: ``python bench/passthrough.py PORT UPSTREAM_URL [aiohttp|nexus]`` (binds 127.0.0.1).

Every request goes to the same path upstream, and the answer comes back as it arrives, chunk by
chunk: no routing, no checks, no parsing, no event splitting. The upstream client is aiohttp (the
usual choice, and the pass-through the trust issue measured Nexus against) or, with ``nexus``,
Nexus's own HTTP/1.1 client (the same transport as Nexus: what is left is Nexus's own work). Both
keep connections alive. It runs under uvicorn with uvloop and httptools, no access log, like
``nexus serve``; scripts/bench pins it to the gateway's CPU.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp
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

    return Starlette(routes=routes_to(forward), lifespan=lifespan)


def make_aiohttp_app(upstream: str) -> Starlette:
    session: aiohttp.ClientSession | None = None

    async def forward(request: Request) -> Response:
        assert session is not None
        body = await request.body()
        resp = await session.request(
            request.method, upstream + request.url.path, data=body, headers=FORWARD
        )
        media = resp.headers.get("content-type", "application/json")
        if media.startswith("text/event-stream"):

            async def chunks() -> AsyncIterator[bytes]:
                try:
                    async for chunk in resp.content.iter_any():
                        yield chunk
                finally:
                    resp.release()

            return StreamingResponse(chunks(), resp.status, media_type=media)
        data = await resp.read()
        return Response(data, resp.status, media_type=media)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        nonlocal session
        session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
        yield
        await session.close()

    return Starlette(routes=routes_to(forward), lifespan=lifespan)


def routes_to(forward: Callable[[Request], Awaitable[Response]]) -> list[Route]:
    return [
        Route("/v1/chat/completions", forward, methods=["POST"]),
        Route("/v1/models", forward, methods=["GET"]),
    ]


def main() -> None:
    port, upstream = int(sys.argv[1]), sys.argv[2].rstrip("/")
    client = sys.argv[3] if len(sys.argv) > 3 else "aiohttp"
    app = make_aiohttp_app(upstream) if client == "aiohttp" else make_app(upstream)
    uvicorn.run(
        app,
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
