"""The outermost layer: request ids, and hot routes answered in front of Starlette."""

from __future__ import annotations

import asyncio

import httpx2
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route

from nexus.api.errors import HANDLERS
from nexus.api.middleware import GatewayMiddleware
from nexus.errors import InvalidRequest


async def boom(scope, receive, send):
    raise RuntimeError("a bug")


async def refuse(scope, receive, send):
    raise InvalidRequest("no thanks", param="x")


async def hello(request):
    return JSONResponse({"hello": request.scope["app"].__class__.__name__})


def call(method: str, path: str, **kwargs):
    app = GatewayMiddleware(
        Starlette(routes=[Route("/hello", hello)], exception_handlers=HANDLERS),
        {"/boom": boom, "/refuse": refuse},
    )

    async def go():
        transport = httpx2.ASGITransport(app=app)
        async with httpx2.AsyncClient(transport=transport, base_url="http://nexus") as client:
            return await client.request(method, path, **kwargs)

    return asyncio.run(go())


def test_a_bug_in_a_hot_route_is_a_logged_500_envelope_with_the_request_id(caplog):
    resp = call("POST", "/boom", headers={"X-Request-Id": "abc-1"})
    assert resp.status_code == 500
    assert resp.json()["error"]["type"] == "server_error"
    assert resp.headers["x-request-id"] == "abc-1"
    assert any("unexpected error" in r.getMessage() for r in caplog.records)


def test_a_nexus_error_in_a_hot_route_is_its_envelope():
    resp = call("POST", "/refuse")
    assert resp.status_code == 400
    assert resp.json()["error"] == {
        "message": "no thanks",
        "type": "invalid_request_error",
        "param": "x",
        "code": "invalid_request_error",
    }
    assert len(resp.headers["x-request-id"]) == 32


def test_other_requests_go_to_starlette_with_a_request_id():
    resp = call("GET", "/hello")
    assert resp.json() == {"hello": "Starlette"}
    assert len(resp.headers["x-request-id"]) == 32
    missing = call("GET", "/nowhere")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
