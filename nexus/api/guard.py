"""The first check of every request: is it meant for this Nexus, and may it change anything?

Loopback is no trust boundary for a browser: any web page can send requests to 127.0.0.1. So:

- every request (HTTP and WebSocket) whose ``Host`` is not a name of this server is refused with
  421 ``invalid_host``: a DNS-rebinding page (its own name, resolved to 127.0.0.1) cannot read
  ``/v1/history``, ``/metrics`` or ``/ws``. Accepted: localhost, 127.0.0.1, ::1, the bind address
  and ``[server] allowed_hosts``, whatever the port; on a wildcard bind (0.0.0.0, ::) also any IP
  address, since a page cannot rebind a literal address. A request without ``Host`` is no
  browser's and passes. (A refused WebSocket handshake is a plain 403: see the middleware.)
- a request that changes state (POST, PUT, PATCH, DELETE) and every WebSocket must come from no
  page (no ``Origin``: curl, SDKs) or from this server's own origin, scheme, host and port alike
  (403 ``invalid_origin``);
- such a request with a body must say ``Content-Type: application/json`` (415): the types a page
  may send without a CORS preflight (text/plain, forms) are refused.

It runs in front of everything, hot routes included, so it is a few byte compares and one set
lookup on the ``Host`` bytes; everything else is worked out once, when the app is created.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

from starlette.types import Scope

from ..config import ServerSettings, host_name
from ..errors import (
    CrossOrigin,
    InvalidRequest,
    MisdirectedRequest,
    NexusError,
    UnsupportedMediaType,
)

STATE_CHANGING = frozenset({"POST", "PUT", "PATCH", "DELETE"})
LOCAL_NAMES = ("localhost", "127.0.0.1", "::1")
WILDCARD_BINDS = frozenset({"", "0.0.0.0", "::"})
JSON = b"application/json"
_SCHEMES = {"http": b"http", "https": b"https", "ws": b"http", "wss": b"https"}
_DEFAULT_PORTS = {b"http": b":80", b"https": b":443"}
SHOWN_CHARS = 100  # of a refused Host or Origin, in the message


class Guard:
    def __init__(
        self,
        names: Iterable[str],
        *,
        port: int | None = None,
        any_host: bool = False,
        any_address: bool = False,
    ) -> None:
        self.names = frozenset(host_name(name) for name in names)
        self.any_host = any_host
        self.any_address = any_address
        # The Host values clients send, byte for byte, for one set lookup before any parsing.
        exact: set[bytes] = set()
        for name in self.names:
            shown = f"[{name}]" if ":" in name else name
            exact.add(shown.encode())
            if port is not None:
                exact.add(f"{shown}:{port}".encode())
        self.exact = frozenset(exact)

    @classmethod
    def of(cls, server: ServerSettings) -> Guard:
        names = {*LOCAL_NAMES, *server.allowed_hosts}
        bind = server.host.strip().lower().strip("[]")
        wildcard = bind in WILDCARD_BINDS
        if not wildcard:
            names.add(bind)
        return cls(names - {"*"}, port=server.port, any_host="*" in names, any_address=wildcard)

    def check(self, scope: Scope) -> NexusError | None:
        """The refusal for this request, or None when it may go on."""
        host = origin = content_type = None
        has_body = False
        for name, value in scope["headers"]:
            if name == b"host":
                if host is not None:  # which one is meant? (RFC 9112: answer 400)
                    return InvalidRequest("The request has more than one Host header")
                host = value
            elif name == b"origin":
                origin = value
            elif name == b"content-type":
                content_type = value
            elif name == b"content-length":
                has_body = value != b"0"
            elif name == b"transfer-encoding":
                has_body = True
        if host is not None and host not in self.exact and not self.allows(host):
            return MisdirectedRequest(
                f"Host '{_shown(host)}' is not a name of this server, so the request is refused "
                "(DNS-rebinding protection); if it is yours, add it to [server] allowed_hosts"
            )
        websocket = scope["type"] == "websocket"
        if not websocket and scope["method"] not in STATE_CHANGING:
            return None
        if origin is not None and not same_origin(origin, scope.get("scheme", "http"), host):
            return CrossOrigin(
                f"Origin '{_shown(origin)}' is not this server: a page of another site may not "
                "use Nexus (send no Origin, or use the page Nexus serves itself)"
            )
        if websocket or content_type == JSON:
            return None
        if scope["method"] == "DELETE" and not has_body:
            return None  # nothing to read; and no page sends DELETE without a CORS preflight
        if content_type is not None and is_json(content_type):
            return None
        got = "none" if content_type is None else f"'{_shown(content_type)}'"
        return UnsupportedMediaType(f"Content-Type must be application/json (got {got})")

    def allows(self, host: bytes) -> bool:
        """``host`` (a Host header, any port) names this server; the slow path of ``check``."""
        if self.any_host:
            return True
        text = host.decode("latin-1").strip().lower()
        if text.startswith("["):
            name, bracket, rest = text[1:].partition("]")
            if not bracket or (rest and not (rest[:1] == ":" and rest[1:].isdecimal())):
                return False
        elif text.count(":") == 1:
            name, _, port = text.partition(":")
            if port and not port.isdecimal():  # "localhost:abc" is no Host of anybody's
                return False
        else:
            name = text
        name = name.removesuffix(".")  # "localhost." is the same name
        if name in self.names:
            return True
        return self.any_address and _is_address(name)


def same_origin(origin: bytes, scheme: str, host: bytes | None) -> bool:
    """``origin`` is this server as the request reached it: scheme, host and port."""
    own_scheme = _SCHEMES.get(scheme)
    if host is None or own_scheme is None:
        return False
    own = own_scheme + b"://" + host
    if origin == own:
        return True
    return _without_default_port(origin.strip().lower()) == _without_default_port(own.lower())


def is_json(content_type: bytes) -> bool:
    """``application/json``, with or without parameters (``; charset=utf-8``)."""
    return content_type.partition(b";")[0].strip().lower() == JSON


def _without_default_port(origin: bytes) -> bytes:
    scheme = origin.partition(b"://")[0]
    default = _DEFAULT_PORTS.get(scheme)
    return origin.removesuffix(default) if default is not None else origin


def _is_address(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def _shown(value: bytes) -> str:
    text = value.decode("latin-1")
    return text if len(text) <= SHOWN_CHARS else text[:SHOWN_CHARS] + "..."
