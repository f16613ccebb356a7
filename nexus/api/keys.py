"""Client keys through the admin API, and ``GET /v1/usage`` for a key's holder.

``POST /admin/keys`` creates a key and answers its settings with ``key``, the secret, which is
never shown again. ``GET /admin/keys`` lists them (a prefix, never the secret);
``GET/PATCH/DELETE /admin/keys/{name}`` shows, changes or revokes one. The admin API's rules
hold: loopback only unless ``[server] admin_key_env`` is set, then that key is required.
"""

from __future__ import annotations

import time
from typing import Any, TypeVar

from pydantic import ValidationError
from starlette.types import Receive, Scope, Send

from ..config import KeyLimits, KeyName
from ..errors import Conflict, InvalidRequest, NotFound, Unauthorized
from ..gateway import Gateway
from ..keys.ring import SETTINGS, ClientKey, KeyRing, NameTaken
from .auth import key_of
from .backends import authorize
from .http import dumps, parse_object, read_body, send_json
from .openai import gateway_of

MAX_BODY = 64 * 1024


class NewKey(KeyLimits):
    name: KeyName


class AdminKeys:
    """``/admin/keys`` and ``/admin/keys/{name}``."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        gateway = gateway_of(scope)
        authorize(scope, gateway.settings.server.admin_key())
        ring = _ring(gateway)
        method = scope["method"]
        name = scope.get("path_params", {}).get("name")
        if name is None:
            if method == "POST":
                await self._create(ring, scope, receive, send)
            else:
                keys = sorted(ring, key=lambda k: k.name)
                views = [_view(key, usage=True) for key in keys]
                await send_json(send, 200, dumps({"object": "list", "data": views}))
            return
        key = ring.get(name)
        if key is None:
            raise NotFound(f"No key named '{name}'")
        if method == "GET":
            await send_json(send, 200, dumps(_view(key, usage=True)))
        elif method == "PATCH":
            await self._update(ring, key, scope, receive, send)
        else:
            _writable(key)
            if key.revoked_at is None:
                await ring.revoke(key)
            await send_json(send, 200, dumps({**_view(key), "revoked": True}))

    async def _create(self, ring: KeyRing, scope: Scope, receive: Receive, send: Send) -> None:
        body = parse_object(await read_body(scope, receive, MAX_BODY))
        new = _validated(NewKey, body)
        existing = ring.get(new.name)
        if existing is not None and (existing.revoked_at is None or existing.source == "config"):
            raise Conflict(f"a key named '{new.name}' already exists", param="name")
        limits = KeyLimits.model_validate(new.model_dump(include=set(SETTINGS)))
        try:
            key, secret = await ring.create(new.name, limits)
        except NameTaken:
            raise Conflict(f"a key named '{new.name}' already exists", param="name") from None
        await send_json(send, 201, dumps({**_view(key), "key": secret}))

    async def _update(
        self, ring: KeyRing, key: ClientKey, scope: Scope, receive: Receive, send: Send
    ) -> None:
        _writable(key)
        if key.revoked_at is not None:
            raise Conflict(f"the key '{key.name}' is revoked; create a new one")
        body = parse_object(await read_body(scope, receive, MAX_BODY))
        unknown = set(body) - set(SETTINGS)
        if "name" in unknown:
            raise InvalidRequest("a key's name cannot change; create a new key", param="name")
        if "max_zone" in body and body["max_zone"] is None:
            body["max_zone"] = "open"  # null clears a setting: this one's default is "open"
        merged = {**key.limits.model_dump(mode="json"), **body}
        limits = _validated(KeyLimits, merged)
        await ring.update(key, limits)
        await send_json(send, 200, dumps(_view(key)))


class OwnUsage:
    """``GET /v1/usage``: the calling key's own usage this month and its limits."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        gateway = gateway_of(scope)
        key = key_of(scope)
        if key is None:
            raise Unauthorized("GET /v1/usage needs [auth] enabled = true and a key")
        ring = _ring(gateway)
        now = ring.clock()
        requests_left, tokens_left = key.window.remaining(now)
        limits = key.limits
        body = {
            "key": key.name,
            "month": ring.month,
            "usage": key.usage.view(),
            "limits": limits.model_dump(mode="json"),
            "remaining": {
                "monthly_budget_usd": None
                if limits.monthly_budget_usd is None
                else round(max(0.0, limits.monthly_budget_usd - key.usage.cost_usd), 8),
                "requests_this_minute": requests_left,
                "tokens_this_minute": tokens_left,
            },
            "in_flight": key.window.in_flight,
            "time": int(time.time()),
        }
        await send_json(send, 200, dumps(body))


def _ring(gateway: Gateway) -> KeyRing:
    """The key set, each key's usage up to date (``Gateway.key_ring``)."""
    ring = gateway.key_ring()
    if ring is None:  # only before start-up has finished
        raise Conflict("client keys are not loaded yet")
    return ring


def _writable(key: ClientKey) -> None:
    if key.source == "config":
        raise Conflict(
            f"the key '{key.name}' is declared in the config file ([[auth.keys]]); change it there"
        )


M = TypeVar("M", bound=KeyLimits)


def _validated(model: type[M], body: dict[str, Any]) -> M:
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or None
        message = f"{where}: {first['msg']}" if where else str(first["msg"])
        raise InvalidRequest(message, param=where) from None


def _view(key: ClientKey, usage: bool = False) -> dict[str, Any]:
    view = key.view()
    if usage:
        view["usage"] = key.usage.view()
        view["in_flight"] = key.window.in_flight
    return view
