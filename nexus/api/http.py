"""Small raw-ASGI pieces for the hot path: read a bounded body, send a JSON answer."""

from __future__ import annotations

from typing import Any

import orjson
from starlette.types import Receive, Scope, Send

from ..errors import InvalidRequest, JSONDict, PayloadTooLarge

MAX_BODY_BYTES = 10 * 1024 * 1024
JSON_TYPE = (b"content-type", b"application/json")
# An ASGI extension of Nexus's own HTTP server (``scope["extensions"]``): a response start may
# carry, under this key, header lines Nexus made itself (``name: value\r\n`` each, checked when
# made), written as they are. Under any other server they go in ``headers``.
RAW_HEAD = "nexus.raw_head"


def header_pairs(lines: bytes) -> list[tuple[bytes, bytes]]:
    """Header lines (``name: value\\r\\n`` each) as ``(name, value)`` pairs."""
    return [
        (name, value)
        for name, _, value in (line.partition(b": ") for line in lines.split(b"\r\n"))
        if name
    ]


class ClientGone(Exception):
    """The client disconnected before its request was read; nobody is left to answer."""


async def read_body(scope: Scope, receive: Receive, limit: int = MAX_BODY_BYTES) -> bytes:
    for name, value in scope["headers"]:
        if name == b"content-length" and value.isdigit() and int(value) > limit:
            raise PayloadTooLarge(_too_large(limit))
    message = await receive()
    if message["type"] == "http.disconnect":
        raise ClientGone
    body: bytes = message.get("body", b"")
    if not message.get("more_body", False):
        if len(body) > limit:
            raise PayloadTooLarge(_too_large(limit))
        return body
    chunks = [body]
    size = len(body)
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(_too_large(limit))
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def _too_large(limit: int) -> str:
    return f"Request body is larger than the limit of {limit // (1024 * 1024)} MiB"


def parse_object(raw: bytes) -> JSONDict:
    if not raw:
        raise InvalidRequest("Request body is empty; send a JSON object")
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest(f"Request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise InvalidRequest("Request body must be a JSON object")
    return body


def client_headers(scope: Scope) -> dict[str, str]:
    return {name.decode("latin-1"): value.decode("latin-1") for name, value in scope["headers"]}


async def send_json(
    send: Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]] | None = None
) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                JSON_TYPE,
                (b"content-length", str(len(body)).encode()),
                *(headers or ()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


def dumps(data: Any) -> bytes:
    return orjson.dumps(data)
