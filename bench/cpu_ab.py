"""CPU per request of two Nexus configurations in one process, without the network's noise.

  python bench/cpu_ab.py --a A.toml --b B.toml [--b-auth KEY] [--rounds 100]

Each configuration's app is built as ``nexus serve`` builds it and driven through Nexus's own
HTTP protocol (uvicorn's, with Nexus's bounds and response head) over an in-memory transport, one
sequential keep-alive connection each, against the real mock upstream (bench/mock_upstream.py)
on loopback. Rounds of ``--per-round`` requests alternate A and B; the figure is the main
thread's CPU time per request (the SQLite writer thread is not counted). Between two gateway
processes the same code can differ by a few per cent (address layout, the host's other work);
in one process the difference is the code's. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import uvloop
from uvicorn.server import ServerState

from nexus.app import create_app
from nexus.config import load_settings
from nexus.serving import uvicorn_config

BODY = b'{"model":"mock-model","messages":[{"role":"user","content":"hi"}]}'
_LENGTH = re.compile(rb"\r\ncontent-length: (\d+)", re.IGNORECASE)


class Transport(asyncio.Transport):
    """Takes what the server writes; ``answer`` resolves once a whole response is in."""

    def __init__(self) -> None:
        super().__init__()
        self.buffer = bytearray()
        self.answer: asyncio.Future[bytes] | None = None

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"sockname": ("127.0.0.1", 8000), "peername": ("127.0.0.1", 5000)}.get(name, default)

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.buffer += data
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            return
        length = _LENGTH.search(self.buffer, 0, end + 2)
        if length and len(self.buffer) >= end + 4 + int(length.group(1)):
            whole = bytes(self.buffer)
            self.buffer.clear()
            if self.answer is not None and not self.answer.done():
                self.answer.set_result(whole)

    def is_closing(self) -> bool:
        return False

    def close(self) -> None:
        pass

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def get_write_buffer_size(self) -> int:
        return 0


class Side:
    def __init__(self, config: Path, key: str | None) -> None:
        self.settings = load_settings(config)
        self.config = uvicorn_config(self.settings, create_app(self.settings))
        self.config.load()
        head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        head += b"Content-Type: application/json\r\n"
        if key:
            head += b"Authorization: Bearer " + key.encode() + b"\r\n"
        self.request = head + b"Content-Length: %d\r\n\r\n" % len(BODY) + BODY
        self.lifespan: asyncio.Task[None] | None = None
        self.cpu: list[float] = []

    async def start(self) -> None:
        app = self.config.loaded_app
        self.inbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.outbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        await self.inbox.put({"type": "lifespan.startup"})
        scope = {"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}
        self.lifespan = asyncio.create_task(app(scope, self.inbox.get, self.outbox.put))
        started = await self.outbox.get()
        if started["type"] != "lifespan.startup.complete":
            raise RuntimeError(f"start-up failed: {started}")
        self.protocol = self.config.http_protocol_class(  # type: ignore[call-arg]
            config=self.config, server_state=ServerState(), app_state={}
        )
        self.transport = Transport()
        self.protocol.connection_made(self.transport)

    async def one(self) -> None:
        self.transport.answer = asyncio.get_running_loop().create_future()
        self.protocol.data_received(self.request)
        answer = await self.transport.answer
        if not answer.startswith(b"HTTP/1.1 200"):
            raise RuntimeError(f"not a 200: {answer[:200]!r}")

    async def stop(self) -> None:
        await self.inbox.put({"type": "lifespan.shutdown"})
        await self.outbox.get()
        if self.lifespan is not None:
            await self.lifespan

    async def round(self, requests: int) -> None:
        began = time.thread_time()
        for _ in range(requests):
            await self.one()
        self.cpu.append((time.thread_time() - began) / requests * 1e6)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    a, b = Side(Path(args.a), args.a_auth), Side(Path(args.b), args.b_auth)
    for side in (a, b):
        await side.start()
        for _ in range(args.warmup):
            await side.one()
    gc.collect()
    gc.freeze()  # as nexus serve does
    for i in range(args.rounds):
        for side in (a, b) if i % 2 == 0 else (b, a):
            await side.round(args.per_round)
    for side in (a, b):
        await side.stop()
    deltas = [y - x for x, y in zip(a.cpu, b.cpu, strict=True)]
    base = statistics.median(a.cpu)
    added = statistics.median(deltas)
    return {
        "rounds": args.rounds,
        "per_round": args.per_round,
        "a_us": base,
        "b_us": statistics.median(b.cpu),
        "added_us": added,
        "added_share": added / base,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--a", required=True, help="config of the reference")
    p.add_argument("--b", required=True, help="config compared with it")
    p.add_argument("--a-auth", help="client key for A")
    p.add_argument("--b-auth", help="client key for B")
    p.add_argument("--rounds", type=int, default=100)
    p.add_argument("--per-round", type=int, default=200)
    p.add_argument("--warmup", type=int, default=500)
    args = p.parse_args()
    result = uvloop.run(run(args))
    json.dump(result, sys.stdout)
    print()


if __name__ == "__main__":
    main()
