"""The backends API: ``GET /v1/backends`` for everyone; adding and removing backends at run time
through ``/admin/backends``, which answers only on loopback unless an admin key is configured
(then the key is required, compared in constant time; a wrong one gets a 401 envelope)."""

from __future__ import annotations

import hmac
import ipaddress
from typing import Any

from starlette.types import Receive, Scope, Send

from ..config import BackendSettings, ConfigError, Settings, settings_from_dict
from ..errors import Forbidden, InvalidRequest, NotFound, Unauthorized
from ..gateway import Gateway, backend_from
from ..registry import Backend
from .http import dumps, parse_object, read_body, send_json
from .openai import gateway_of


def backend_view(gateway: Gateway, backend: Backend) -> dict[str, Any]:
    return {
        "name": backend.name,
        "url": backend.shown_url,
        "type": backend.type,
        "location": backend.location,
        "zone": backend.zone,
        "tier": backend.tier,
        "priority": backend.priority,
        "source": backend.source,
        "status": backend.status.value,
        "last_error": _shown_error(backend),
        "probe_latency_ms": _round(backend.latency_ms),
        "latency_ms": _round(backend.ewma_latency_ms),
        "ttft_ms": _round(backend.ewma_ttft_ms),
        "in_flight": backend.in_flight,
        "capacity": backend.capacity(gateway.settings.routing.default_max_concurrent),
        "requests": backend.total_requests,
        "models": sorted(backend.models),
    }


def _shown_error(backend: Backend) -> str | None:
    error = backend.unavailable or backend.last_error
    return None if error is None else backend.redact(error)


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


class BackendList:
    """``GET /v1/backends``."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        gateway = gateway_of(scope)
        data = [backend_view(gateway, b) for b in gateway.registry]
        await send_json(send, 200, dumps({"object": "list", "data": data}))


class AdminBackends:
    """``POST /admin/backends`` (add) and ``DELETE /admin/backends/{name}`` (remove)."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        gateway = gateway_of(scope)
        authorize(scope, gateway.settings.server.admin_key())
        if scope["method"] == "POST":
            await self._add(gateway, scope, receive, send)
        else:
            name = scope["path_params"]["name"]
            if gateway.registry.remove(name) is None:
                raise NotFound(f"No backend named '{name}'")
            await send_json(send, 200, dumps({"removed": name}))

    async def _add(self, gateway: Gateway, scope: Scope, receive: Receive, send: Send) -> None:
        body = parse_object(await read_body(scope, receive))
        spec = _spec(body)
        if spec.managed is not None:
            raise InvalidRequest("managed backends can only be configured in the config file")
        if gateway.registry.get(spec.name) is not None:
            raise InvalidRequest(f"a backend named '{spec.name}' already exists", param="name")
        _check_key_variable(spec, gateway.settings)
        backend = backend_from(spec)
        backend.source = "manual"
        gateway.registry.add(backend)
        if backend.unavailable is None:
            await gateway.health.check(backend)
        await send_json(send, 201, dumps(backend_view(gateway, backend)))


def _spec(body: dict[str, Any]) -> BackendSettings:
    try:
        return settings_from_dict({"backends": [body]}, origin="backend").backends[0]
    except ConfigError as exc:
        raise InvalidRequest(str(exc).replace("backend: invalid configuration\n  ", "")) from None


def _check_key_variable(spec: BackendSettings, settings: Settings) -> None:
    """Only a variable the config file itself names may be read for an added backend: the admin
    API must not be a way to send any of the server's environment to a URL of the caller's."""
    if spec.api_key_env is None or spec.api_key_env in settings.key_variables():
        return
    named = ", ".join(sorted(settings.key_variables())) or "none"
    raise InvalidRequest(
        f"api_key_env '{spec.api_key_env}' is not named in the config file; a backend added at "
        f"run time may only use a variable that a [[backends]] api_key_env or [server] "
        f"admin_key_env names (here: {named})",
        param="api_key_env",
    )


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)
    return address.is_loopback or bool(mapped and mapped.is_loopback)


def authorize(scope: Scope, key: str | None) -> None:
    if key is None:
        client = (scope.get("client") or ("", 0))[0] or ""
        if not is_loopback(client):
            raise Forbidden(
                "The admin API answers only on loopback; set [server] admin_key_env to use it "
                "from elsewhere"
            )
        proxied = _proxy_header(scope)
        if proxied is not None:
            raise Forbidden(
                f"The request came through a proxy ({proxied}), so its loopback address says "
                "nothing about the caller; set [server] admin_key_env to use the admin API"
            )
        return
    sent = ""
    for name, value in scope["headers"]:
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").strip().partition(" ")
            sent = token.strip() if scheme.lower() == "bearer" else ""
    if not hmac.compare_digest(sent.encode(), key.encode()):
        raise Unauthorized("Missing or wrong admin key (send it as Authorization: Bearer <key>)")


_PROXY_HEADERS = {
    b"forwarded": "Forwarded",
    b"x-forwarded-for": "X-Forwarded-For",
    b"x-real-ip": "X-Real-IP",
}


def _proxy_header(scope: Scope) -> str | None:
    """The name of a header a proxy adds, when the request carries one."""
    for name, _ in scope["headers"]:
        shown = _PROXY_HEADERS.get(name)
        if shown is not None:
            return shown
    return None
