"""uvicorn's HTTP/1.1 and WebSocket protocols with the bounds a gateway needs.

uvicorn by itself caps neither the client connections nor the time a request's head or body may
take (a slowloris holds a socket for ever by sending a byte now and then), lets a head grow without
limit, leaves a non-GET ``Upgrade`` request unanswered and answers malformed HTTP in plain text.
Here: past ``max_connections`` a new connection gets a 503 at once and is closed; a head must
arrive whole within ``header_timeout`` (counted from the connection, or from the first byte of a
later request) and a body within ``body_timeout`` of its head, else 408; a head past
``MAX_HEAD_BYTES`` is a 431; every such answer is an OpenAI envelope written straight to the
socket, and the connection is closed after it. One timer per connection at most, armed only while
a head or body is incomplete after a read: a request that arrives in one read costs no timer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import resource
import urllib.parse
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import httptools
import orjson
from uvicorn.protocols.http.flow_control import service_unavailable
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from websockets.datastructures import Headers
from websockets.http11 import Response
from websockets.server import ServerProtocol

from .api.http import RAW_HEAD
from .config import ServerSettings
from .errors import (
    HeadTooLarge,
    InvalidRequest,
    NexusError,
    RequestTimeout,
    TooManyConnections,
    error_envelope,
)
from .server_cycle import NexusCycle

log = logging.getLogger("nexus.server")

MAX_HEAD_BYTES = 64 * 1024  # request line and headers, however many reads they come in
FD_RESERVE = 256  # descriptors kept for logs, state, discovery and the listening sockets
WARN_EVERY = 10.0  # seconds between two warnings that the connection cap is reached

Phase = Literal["head", "body", "idle"]
_EXTENSIONS: dict[str, dict[object, object]] = {RAW_HEAD: {}}  # what this server offers, shared


@dataclass(frozen=True, slots=True)
class ConnectionLimits:
    max_connections: int = 1024
    header_timeout: float = 10.0
    body_timeout: float = 60.0
    max_head_bytes: int = MAX_HEAD_BYTES

    @classmethod
    def of(cls, server: ServerSettings) -> ConnectionLimits:
        return cls(
            max_connections=server.max_connections,
            header_timeout=server.header_timeout_seconds,
            body_timeout=server.body_timeout_seconds,
        )


class _Stop(Exception):
    """Raised from a parser callback to stop parsing a request that was already answered."""


class NexusHTTPProtocol(HttpToolsProtocol):
    limits: ClassVar[ConnectionLimits] = ConnectionLimits()
    _quiet_until: ClassVar[float] = 0.0

    @classmethod
    def with_limits(cls, limits: ConnectionLimits) -> type[NexusHTTPProtocol]:
        """The class uvicorn instantiates per connection, carrying ``limits``."""
        return type(cls.__name__, (cls,), {"limits": limits})

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Nexus logs requests itself (``nexus.access``); uvicorn's access log is off even where
        # its logger has handlers (uvicorn decides by those, e.g. under a test's log capture).
        self.access_log = False
        self._phase: Phase = "head"
        self._head_bytes = 0
        self._timer: asyncio.TimerHandle | None = None

    # --- connection ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        if len(self.connections) >= self.limits.max_connections:
            self.transport = transport
            self._warn_full()
            self._write_and_close(
                TooManyConnections(
                    f"Nexus is at its limit of {self.limits.max_connections} client "
                    "connections ([server] max_connections); retry shortly"
                )
            )
            return
        super().connection_made(transport)
        self._arm(self.limits.header_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        self._unset_keepalive_if_required()
        limit = self.limits.max_head_bytes
        if self._phase != "body" and len(data) + self._head_bytes > limit:
            # Rare (a large read): the head may be over the limit. Its end must come in time.
            end = data.find(b"\r\n\r\n")
            if end < 0 or self._head_bytes + end + 4 > limit:
                self._phase = "head"
                self._reject(HeadTooLarge(f"Request line and headers exceed {limit // 1024} KiB"))
                return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._upgrade()
            return
        except httptools.HttpParserError as exc:
            self._reject(InvalidRequest(f"Malformed HTTP request: {exc}"))
            return
        phase = self._phase
        if phase == "idle":
            return
        if self._timer is None:
            timeout = self.limits.header_timeout if phase == "head" else self.limits.body_timeout
            self._arm(timeout)
        if phase == "head":  # unfinished: what came so far counts (a little more, at worst)
            self._head_bytes += len(data)

    # --- parser callbacks (per request: the parent is called directly, a zero-argument
    # super() would cost more than the rest of each override) --------------------------

    def on_message_begin(self) -> None:
        HttpToolsProtocol.on_message_begin(self)
        self.scope["extensions"] = _EXTENSIONS
        self._phase = "head"
        self._head_bytes = 0

    def on_headers_complete(self) -> None:
        if self._timer is not None:
            self._cancel()
        if self.url[:1] != b"/" and self.url != b"*":
            # Absolute-form (``GET http://host/path``) is for proxies, and its authority would
            # override Host: refuse it rather than let it slip past the Host check.
            self._reject(InvalidRequest("The request target must be a path (Nexus is not a proxy)"))
            raise _Stop
        if self.parser.should_upgrade() and self.parser.get_method() != b"GET":
            # httptools would take the body for the new protocol's bytes: refuse, do not guess.
            self._reject(
                InvalidRequest(
                    "Upgrade is supported only for WebSocket handshakes (GET /ws); "
                    "send this request without 'Connection: upgrade'"
                )
            )
            raise _Stop
        # The phase moves on only once the request's cycle exists: the URL may still be refused
        # (too long), and that refusal must answer this request, not a cycle's.
        self._begin_cycle()
        self._phase = "body"
        self._head_bytes = 0

    def _begin_cycle(self) -> None:
        """uvicorn's own ``on_headers_complete`` (0.54), but the cycle is a ``NexusCycle``
        (made as one: changing an object's class later slows every attribute read on it)."""
        scope = self.scope
        http_version = self.parser.get_http_version()
        scope["method"] = self.parser.get_method().decode("ascii")
        if http_version != "1.1":
            scope["http_version"] = http_version
        if self.parser.should_upgrade() and self._should_upgrade():
            return
        url = httptools.parse_url(self.url)
        raw_path = url.path
        path = raw_path.decode("ascii")
        if "%" in path:
            path = urllib.parse.unquote(path)
        scope["path"] = self.root_path + path
        scope["raw_path"] = self.root_path.encode("ascii") + raw_path
        scope["query_string"] = url.query or b""
        app = self.app
        limit = self.limit_concurrency
        if limit is not None and (len(self.connections) >= limit or len(self.tasks) >= limit):
            app = service_unavailable
            self.logger.warning("Exceeded concurrency limit.")
        existing = self.cycle
        self.cycle = NexusCycle(
            scope=scope,
            transport=self.transport,
            flow=self.flow,
            logger=self.logger,
            access_logger=self.access_logger,
            access_log=self.access_log,
            default_headers=self.server_state.default_headers,
            message_event=asyncio.Event(),
            expect_100_continue=self.expect_100_continue,
            keep_alive=http_version != "1.0" and self.parser.should_keep_alive(),
            on_response=self.on_response_complete,
        )
        if existing is None or existing.response_complete:
            self._start_asgi_task(self.cycle, app)
        else:  # pipelined: queued behind the request being answered
            self.flow.pause_reading()
            self.pipeline.appendleft((self.cycle, app))

    def on_message_complete(self) -> None:
        if self._timer is not None:
            self._cancel()
        self._phase = "idle"
        HttpToolsProtocol.on_message_complete(self)

    # --- deadlines and refusals -----------------------------------------------------------

    def _arm(self, seconds: float) -> None:
        self._timer = self.loop.call_at(self.loop.time() + seconds, self._expired)

    def _cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _expired(self) -> None:
        self._timer = None
        if self.transport.is_closing():
            return
        if self._phase == "body" and self.pipeline:
            # Queued behind an earlier response, its body is not being read yet: not its fault.
            self._arm(self.limits.body_timeout)
            return
        what = "head (request line and headers)" if self._phase == "head" else "body"
        seconds = self.limits.header_timeout if self._phase == "head" else self.limits.body_timeout
        self._reject(RequestTimeout(f"The request {what} did not arrive within {seconds:g} s"))

    def _reject(self, error: NexusError) -> None:
        """Answer the request being read with ``error`` and close. An answer never interleaves
        with another response: while an earlier one is being written, the connection closes
        when it ends; once the answer to this request has started, it is closed at once."""
        self._cancel()
        if self.transport.is_closing():
            return
        cycle = self.cycle
        if self._phase == "body":
            if cycle.response_started or self.pipeline:
                self.transport.close()
                return
            cycle.disconnected = True  # its handler, waiting for the body, sees the client gone
            cycle.message_event.set()
        elif cycle is not None and not cycle.response_complete:
            cycle.keep_alive = False
            self.flow.pause_reading()
            return
        log.info("refused a request from %s: %s", _address(self.client), error.message)
        self._write_and_close(error)

    def _write_and_close(self, error: NexusError) -> None:
        body = error.body()
        head = [STATUS_LINE[error.status_code]]
        extra = [(k.lower().encode(), v.encode()) for k, v in error.headers().items()]
        for name, value in [
            *self.server_state.default_headers,
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"connection", b"close"),
            *extra,
        ]:
            head += [name, b": ", value, b"\r\n"]
        self.transport.write(b"".join([*head, b"\r\n", body]))
        if self.transport.get_write_buffer_size():
            self.transport.abort()  # the client reads nothing: do not wait on it
        else:
            self.transport.close()

    def _upgrade(self) -> None:
        if self._should_upgrade():
            self._cancel()
            self.handle_websocket_upgrade()
        else:
            self._unsupported_upgrade_warning()

    def _warn_full(self) -> None:
        now = self.loop.time()
        if now >= NexusHTTPProtocol._quiet_until:
            NexusHTTPProtocol._quiet_until = now + WARN_EVERY
            log.warning(
                "refusing new client connections: %d are open ([server] max_connections)",
                len(self.connections),
            )


class EnvelopeServerProtocol(ServerProtocol):
    """websockets' server side; a refused handshake is answered with an envelope, not text."""

    def reject(self, status: Any, text: str) -> Response:
        response = super().reject(status, text)
        code = response.status_code
        message = " ".join(text.split()) or f"WebSocket handshake refused: {response.reason_phrase}"
        kind = "permission_error" if code == 403 else "invalid_request_error"
        if code >= 500:
            kind = "server_error"
        body = orjson.dumps(error_envelope(message, kind, _WS_CODES.get(code, "bad_handshake")))
        headers = Headers(
            [(k, v) for k, v in response.headers.raw_items() if k.lower() != "content-type"]
        )
        headers["Content-Type"] = "application/json"
        del headers["Content-Length"]
        headers["Content-Length"] = str(len(body))
        return Response(code, response.reason_phrase, headers, body)


_WS_CODES = {403: "forbidden", 405: "method_not_allowed", 426: "upgrade_required"}


class NexusWebSocketProtocol(WebSocketsSansIOProtocol):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # uvicorn builds a plain ServerProtocol; only its refusals change, so its class is swapped.
        self.conn.__class__ = EnvelopeServerProtocol


def ensure_fd_limit(server: ServerSettings) -> None:
    """Raise the soft descriptor limit towards the hard one so that the connection caps, not
    the kernel, decide when Nexus refuses work; warn when even the hard limit is too low."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    needed = server.max_connections + server.max_concurrent_requests + FD_RESERVE
    if soft != resource.RLIM_INFINITY and soft < needed:
        target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
    if soft != resource.RLIM_INFINITY and soft < needed:
        log.warning(
            "the descriptor limit (%d) is below max_connections + max_concurrent_requests + %d "
            "(%d): raise it (ulimit -n) or lower those caps",
            soft,
            FD_RESERVE,
            needed,
        )


def _address(client: tuple[str, int] | None) -> str:
    return f"{client[0]}:{client[1]}" if client else "?"
