"""The dashboard's routes: the page and its files, and the ``/ws`` push channel.

``GET /`` serves ``static/index.html``; ``GET /dashboard/{file}`` its script and style sheet. The
page names them with a content hash (``app.js?v=…``), so they are cached for a year and a new
release is fetched at once; the page itself is revalidated on every load (ETag, 304). Everything is
same-origin and the Content-Security-Policy says so.

``/ws`` speaks JSON text frames, server to client only (what the client sends is read and ignored):

- ``{"type": "snapshot", "time": t, "data": {"version", "stats", "backends", "models",
  "history", "series"}}``
  once, first: the whole state, so a page (re)connecting needs nothing else;
- ``{"type": "request", "data": outcome.public()}`` for every request that ends;
- ``{"type": "backends", "data": [backend_view, …]}`` when the backends' views changed, and
  ``{"type": "models", "data": [model, …]}`` when ``/v1/models`` would change (checked each second);
- ``{"type": "stats", "time": t, "data": stats}`` each second (``/v1/stats``: totals, in flight,
  queue depth, the month's spend and ``budget``, and ``keys``: each client key's month and
  limits), which also tells the page the connection is alive.

One ``Hub`` per app fans the messages out: it subscribes to the telemetry when the first page
connects and unsubscribes when the last one leaves, and encodes each message once. Every client has
a bounded queue of messages waiting to be sent; there is no size limit on a message. A client that
cannot keep up (its queue overflows) is closed with 1013 and reconnects to a fresh snapshot; the
others never wait for it. A page from another origin is refused (403): the feed is for this host's
own dashboard only.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import orjson
from starlette.routing import BaseRoute, Route, WebSocketRoute
from starlette.types import Receive, Scope, Send
from starlette.websockets import WebSocket, WebSocketDisconnect

from .. import __version__
from ..api.admin import stats_of
from ..api.backends import backend_view
from ..api.guard import same_origin as is_same_origin
from ..api.openai import gateway_of, model_list
from ..errors import NotFound
from ..gateway import Gateway
from ..telemetry.outcomes import Outcome

log = logging.getLogger("nexus.dashboard")

STATIC_DIR = Path(__file__).parent / "static"
TICK_SECONDS = 1.0  # how often stats are sent and the backends' views compared
SEND_QUEUE_LIMIT = 2048  # messages waiting for one client (a burst of requests ends at once)
CLOSE_TIMEOUT = 10.0  # seconds to get the close frame out to a dropped client
HISTORY_IN_SNAPSHOT = 200  # the last requests, for the page's feed
SERIES_SECONDS = 300  # the charts' window: the snapshot carries per-second totals over it
SERIES_SCAN = 5000  # history entries looked at to build those totals

CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
}
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
SECURITY_HEADERS = [
    (b"content-security-policy", CSP.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
]
REVALIDATE = b"no-cache"
FOREVER = b"public, max-age=31536000, immutable"


def dashboard_routes() -> list[BaseRoute]:
    """``/``, ``/dashboard/{name}`` and ``/ws``; one hub per call, so one per app."""
    files = StaticFiles.load(STATIC_DIR)
    return [
        Route("/", Page(files), methods=["GET", "HEAD"]),
        Route("/dashboard/{name}", AssetFile(files), methods=["GET", "HEAD"]),
        WebSocketRoute("/ws", LiveFeed()),
    ]


# --- the page and its files ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Asset:
    body: bytes
    content_type: str
    version: str  # a hash of the body: the ETag, and the ?v= the page names the file with

    @classmethod
    def of(cls, body: bytes, content_type: str) -> Asset:
        return cls(body, content_type, hashlib.sha256(body).hexdigest()[:16])


class StaticFiles:
    """The files of ``static/``, read once; the page names the others with their version."""

    def __init__(self, index: Asset | None, assets: dict[str, Asset]) -> None:
        self.index = index
        self.assets = assets

    @classmethod
    def load(cls, folder: Path) -> StaticFiles:
        assets: dict[str, Asset] = {}
        if folder.is_dir():
            for path in sorted(folder.iterdir()):
                kind = CONTENT_TYPES.get(path.suffix)
                if kind is not None and path.is_file():
                    assets[path.name] = Asset.of(path.read_bytes(), kind)
        page = assets.pop("index.html", None)
        if page is None:
            log.warning("the dashboard's files are missing from %s; / will answer 404", folder)
            return cls(None, assets)
        html = page.body.decode()
        for name, asset in assets.items():
            html = html.replace(f'"dashboard/{name}"', f'"dashboard/{name}?v={asset.version}"')
        return cls(Asset.of(html.encode(), page.content_type), assets)


class Page:
    """``GET /``: the page; revalidated on every load, so a new release shows at once."""

    def __init__(self, files: StaticFiles) -> None:
        self.files = files

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.files.index is None:
            raise NotFound("The dashboard is not installed (its static files are missing)")
        await _send_asset(scope, send, self.files.index, REVALIDATE)


class AssetFile:
    """``GET /dashboard/{name}``: cached for good when asked for by its current version."""

    def __init__(self, files: StaticFiles) -> None:
        self.files = files

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        name = scope["path_params"]["name"]
        asset = self.files.assets.get(name)
        if asset is None:
            raise NotFound(f"No dashboard file named '{name}'")
        query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
        cache = FOREVER if query.get("v") == [asset.version] else REVALIDATE
        await _send_asset(scope, send, asset, cache)


async def _send_asset(scope: Scope, send: Send, asset: Asset, cache: bytes) -> None:
    etag = f'"{asset.version}"'.encode()
    headers = [(b"etag", etag), (b"cache-control", cache), *SECURITY_HEADERS]
    if _matches(scope, etag):
        await send({"type": "http.response.start", "status": 304, "headers": headers})
        await send({"type": "http.response.body", "body": b""})
        return
    headers += [
        (b"content-type", asset.content_type.encode()),
        (b"content-length", str(len(asset.body)).encode()),
    ]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    body = b"" if scope["method"] == "HEAD" else asset.body
    await send({"type": "http.response.body", "body": body})


def _matches(scope: Scope, etag: bytes) -> bool:
    for name, value in scope["headers"]:
        if name == b"if-none-match":
            tags = [tag.strip().removeprefix(b"W/") for tag in value.split(b",")]
            return etag in tags or b"*" in tags
    return False


# --- the push channel ------------------------------------------------------------------------


def message(kind: str, data: Any, **extra: Any) -> str:
    return orjson.dumps({"type": kind, **extra, "data": data}).decode()


class Client:
    """One connected page: the messages waiting for it, and whether it fell too far behind."""

    def __init__(self, limit: int) -> None:
        self.queue: asyncio.Queue[str] = asyncio.Queue(limit)
        self.overflowed = asyncio.Event()

    def offer(self, text: str) -> None:
        """Never waits: a client whose queue is full is marked to be dropped."""
        if self.overflowed.is_set():
            return
        try:
            self.queue.put_nowait(text)
        except asyncio.QueueFull:
            self.overflowed.set()

    async def pump(self, websocket: WebSocket) -> None:
        while True:
            await websocket.send_text(await self.queue.get())


class Hub:
    """Everything connected clients are sent, built once and offered to each of them."""

    def __init__(self) -> None:
        self.clients: set[Client] = set()
        self.gateway: Gateway | None = None
        self._unsubscribe: Callable[[], None] | None = None
        self._ticker: asyncio.Task[None] | None = None
        self._backends: list[dict[str, Any]] = []
        self._models: list[dict[str, Any]] = []

    @property
    def subscribed(self) -> bool:
        return self._unsubscribe is not None

    def join(self, gateway: Gateway, client: Client) -> None:
        """Send ``client`` the snapshot and add it, without a pause in between: it then gets
        every change after the snapshot and none that the snapshot already holds."""
        if not self.clients:
            self.gateway = gateway
            self._unsubscribe = gateway.telemetry.subscribe(self._on_outcomes)
            self._ticker = asyncio.get_running_loop().create_task(self._tick())
        self._publish_changes()  # the others see what the snapshot shows, too
        client.offer(message("snapshot", self.snapshot(gateway), time=time.time()))
        self.clients.add(client)

    def leave(self, client: Client) -> None:
        self.clients.discard(client)
        if self.clients:
            return
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        if self._ticker is not None:
            self._ticker.cancel()
            self._ticker = None

    def snapshot(self, gateway: Gateway) -> dict[str, Any]:
        stats = stats_of(gateway)  # drains the telemetry: the history below is complete
        return {
            "version": __version__,
            "stats": stats,
            "backends": self._backends,
            "models": self._models,
            "history": gateway.history.last(HISTORY_IN_SNAPSHOT),
            "series": series(gateway.history.last(SERIES_SCAN), time.time()),
        }

    def broadcast(self, text: str) -> None:
        for client in list(self.clients):
            client.offer(text)

    def _on_outcomes(self, batch: list[Outcome]) -> None:
        for outcome in batch:
            self.broadcast(message("request", outcome.public()))

    def _publish_changes(self) -> None:
        gateway = self.gateway
        if gateway is None:
            return
        backends = [backend_view(gateway, backend) for backend in gateway.registry]
        if backends != self._backends:
            self._backends = backends
            self.broadcast(message("backends", backends))
        models: list[dict[str, Any]] = model_list(gateway)["data"]
        if models != self._models:
            self._models = models
            self.broadcast(message("models", models))

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(TICK_SECONDS)
            try:
                if self.gateway is not None:
                    stats = stats_of(self.gateway)
                    self._publish_changes()
                    self.broadcast(message("stats", stats, time=time.time()))
            except Exception:  # a bug here must not end the feed for every page
                log.exception("dashboard update failed")


def series(history: list[dict[str, Any]], now: float) -> dict[str, Any]:
    """Per-second totals over the last ``SERIES_SECONDS``, for the charts: rows of
    ``[second, requests, errors, ok, latency_sum_ms, latency_max_ms]`` (latency of ok ones)."""
    start = int(now) - SERIES_SECONDS
    buckets: dict[int, list[float]] = {}
    for entry in history:
        second = int(entry["time"])
        if second < start:
            continue
        row = buckets.setdefault(second, [second, 0, 0, 0, 0.0, 0.0])
        row[1] += 1
        if entry["status"] >= 400 or entry["error_type"] is not None:
            row[2] += 1
        else:
            row[3] += 1
            row[4] += entry["duration_ms"]
            row[5] = max(row[5], entry["duration_ms"])
    rows = [buckets[second] for second in sorted(buckets)]
    return {"seconds": SERIES_SECONDS, "buckets": [[*r[:4], round(r[4], 3), r[5]] for r in rows]}


class LiveFeed:
    """``/ws``: accept, send the snapshot, then the hub's messages until either side leaves."""

    def __init__(self, queue_limit: int = SEND_QUEUE_LIMIT) -> None:
        self.hub = Hub()
        self.queue_limit = queue_limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        websocket = WebSocket(scope, receive, send)
        if not same_origin(scope):
            await websocket.close(code=1008)  # before accepting: the browser sees a 403
            return
        await websocket.accept()
        client = Client(self.queue_limit)
        self.hub.join(gateway_of(scope), client)
        try:
            dropped = await self._serve(websocket, client)
        finally:
            self.hub.leave(client)
        if dropped:
            log.warning(
                "dashboard client %s dropped: it did not keep up (%d messages waiting)",
                _peer(scope),
                client.queue.qsize(),
            )
            with contextlib.suppress(Exception):
                async with asyncio.timeout(CLOSE_TIMEOUT):
                    await websocket.close(code=1013, reason="too slow: reconnect for a snapshot")

    async def _serve(self, websocket: WebSocket, client: Client) -> bool:
        """Send until the client leaves (False) or falls too far behind (True)."""
        pump = asyncio.create_task(client.pump(websocket))
        listen = asyncio.create_task(_until_disconnect(websocket))
        overflow = asyncio.create_task(client.overflowed.wait())
        tasks = (pump, listen, overflow)
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        if pump in done and not pump.cancelled():
            error = pump.exception()
            if error is not None and not isinstance(error, WebSocketDisconnect | OSError):
                log.error("dashboard feed failed", exc_info=error)
        return overflow in done and listen not in done


async def _until_disconnect(websocket: WebSocket) -> None:
    while True:
        if (await websocket.receive())["type"] == "websocket.disconnect":
            return


def same_origin(scope: Scope) -> bool:
    """No Origin (not a browser) or the page's own origin, scheme, host and port alike; a page
    elsewhere may not listen in. (The app's guard checks this too; the feed does not rely on it.)"""
    headers: dict[bytes, bytes] = dict(scope["headers"])
    origin = headers.get(b"origin")
    if origin is None:
        return True
    return is_same_origin(origin, scope.get("scheme", "ws"), headers.get(b"host"))


def _peer(scope: Scope) -> str:
    client = scope.get("client")
    return f"{client[0]}:{client[1]}" if client else "?"
