"""Soak: many mixed requests through one Nexus process; its memory must stay flat.

    .venv/bin/python bench/soak.py [--requests 100000] [--concurrency 32]

Starts, on free loopback ports, ``bench/mock_upstream.py`` (a good backend), a flaky backend
(this script again, with ``--flaky-upstream PORT``: one request in ten answered 500, one in ten
429, one in twenty-five dropped without an answer) and ``nexus serve`` in front of both
(round-robin, so the flaky one gets half the traffic and its failures fail over). Then sends the
requests with bounded concurrency: chat, streams, embeddings, and the errors a client makes
(unknown models, bad JSON, a missing field, 64 KB model names). Prints the Nexus process's RSS
every 10,000 requests (and at the end: growth after warm-up) and the status counts per kind.
Every process it started is killed by its PID on exit.

Exit status 1 when a request got an answer its kind does not allow, a stream did not end with
``[DONE]``, a transport error happened, or requests were still in flight at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import uvloop

ROOT = Path(__file__).resolve().parents[1]
NEXUS = Path(sys.executable).parent / "nexus"
REPORT_EVERY = 10_000
WARMUP = 10_000  # RSS growth is measured from here: caches, pools and arenas have filled by then
LONG_NAME = "m" * 65_536

# kind -> (share of the requests out of 100, the statuses it may get)
MIX: dict[str, tuple[int, frozenset[int]]] = {
    "chat": (48, frozenset({200})),
    "stream": (20, frozenset({200})),
    "embeddings": (15, frozenset({200})),
    "unknown_model": (5, frozenset({404})),
    "bad_json": (5, frozenset({400})),
    "missing_messages": (4, frozenset({400})),
    "long_model_name": (3, frozenset({400, 404})),
}
assert sum(share for share, _ in MIX.values()) == 100


def schedule() -> list[str]:
    """One round of 100 kinds, interleaved so that every stretch of requests is mixed."""
    kinds = [kind for kind, (share, _) in MIX.items() for _ in range(share)]
    return [kinds[(i * 37) % 100] for i in range(100)]  # 37 is prime to 100: a permutation


def request_for(kind: str, i: int) -> tuple[str, bytes]:
    hello = [{"role": "user", "content": f"soak request {i}"}]
    if kind == "chat":
        return "/v1/chat/completions", _json({"model": "mock-model", "messages": hello})
    if kind == "stream":
        body = {"model": "mock-model", "messages": hello, "stream": True}
        return "/v1/chat/completions", _json(body)
    if kind == "embeddings":
        return "/v1/embeddings", _json({"model": "mock-model", "input": ["a", "b"][: 1 + i % 2]})
    if kind == "unknown_model":
        return "/v1/chat/completions", _json({"model": f"no-such-model-{i}", "messages": hello})
    if kind == "bad_json":
        return "/v1/chat/completions", b'{"model": "mock-model", "messages": ['
    if kind == "missing_messages":
        return "/v1/chat/completions", _json({"model": "mock-model"})
    return "/v1/chat/completions", _json({"model": LONG_NAME + str(i), "messages": hello})


def _json(data: object) -> bytes:
    return json.dumps(data).encode()


# --- the load ----------------------------------------------------------------------------------
@dataclass
class Tally:
    statuses: Counter[str] = field(default_factory=Counter)
    unexpected: Counter[str] = field(default_factory=Counter)
    done = 0


async def one(session: aiohttp.ClientSession, url: str, kind: str, i: int, tally: Tally) -> None:
    path, body = request_for(kind, i)
    headers = {"Content-Type": "application/json"}
    try:
        async with session.post(url + path, data=body, headers=headers) as resp:
            payload = await resp.read()
            status = resp.status
    except (aiohttp.ClientError, TimeoutError) as exc:
        tally.statuses[f"{kind} {type(exc).__name__}"] += 1
        tally.unexpected[f"{kind} {type(exc).__name__}"] += 1
        return
    label = f"{kind} {status}"
    if kind == "stream" and status == 200:
        if not payload.rstrip().endswith(b"data: [DONE]"):
            label += " (no [DONE])"
        elif b'data: {"error"' in payload:
            label += " (error event)"
    tally.statuses[label] += 1
    if status not in MIX[kind][1] or "(" in label:
        tally.unexpected[label] += 1


async def load(url: str, total: int, concurrency: int, pid: int) -> tuple[Tally, list[int]]:
    kinds = schedule()
    tally = Tally()
    rss: list[int] = []  # KiB, after each REPORT_EVERY requests
    counter = iter(range(total))
    started = time.perf_counter()
    timeout = aiohttp.ClientTimeout(total=60)
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def worker() -> None:
            for i in counter:
                await one(session, url, kinds[i % 100], i, tally)
                tally.done += 1
                if tally.done % REPORT_EVERY == 0:
                    rss.append(rss_kib(pid))
                    rate = tally.done / (time.perf_counter() - started)
                    print(
                        f"{tally.done:>8} requests  Nexus RSS {rss[-1] / 1024:7.1f} MiB  "
                        f"{rate:7.0f} req/s  unexpected {sum(tally.unexpected.values())}",
                        flush=True,
                    )

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return tally, rss


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for process {pid}")


# --- the flaky backend (a child process) ---------------------------------------------------------
MODELS = _json({"object": "list", "data": [{"id": "mock-model", "object": "model", "created": 0}]})
CHAT = _json(
    {
        "id": "chatcmpl-flaky",
        "object": "chat.completion",
        "created": 0,
        "model": "mock-model",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "flaky but fine", "refusal": None},
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6},
    }
)
CHUNK = _json(
    {
        "id": "chatcmpl-flaky",
        "object": "chat.completion.chunk",
        "created": 0,
        "model": "mock-model",
        "choices": [{"index": 0, "delta": {"content": "flaky"}, "finish_reason": None}],
    }
)
SSE = b"data: " + CHUNK + b"\n\ndata: [DONE]\n\n"
EMBED = _json(
    {
        "object": "list",
        "model": "mock-model",
        "data": [{"object": "embedding", "index": 0, "embedding": [0.5, 0.5]}],
        "usage": {"prompt_tokens": 1, "total_tokens": 1},
    }
)
ERROR = _json({"error": {"message": "flaky", "type": "server_error", "code": None}})


def answer(status: int, kind: bytes, body: bytes, extra: bytes = b"") -> bytes:
    head = b"HTTP/1.1 %d Flaky\r\nContent-Type: %s\r\nContent-Length: %d\r\n%s\r\n"
    return head % (status, kind, len(body), extra) + body


async def flaky_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    posts = 0
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":", 1)[1])
            body = await reader.readexactly(length)
            path = head.split(b" ", 2)[1]
            if path == b"/v1/models":
                writer.write(answer(200, b"application/json", MODELS))
                await writer.drain()
                continue
            posts += 1
            if posts % 25 == 11:
                return  # dropped: no answer at all
            if posts % 10 == 3:
                writer.write(answer(500, b"application/json", ERROR))
            elif posts % 10 == 7:
                writer.write(answer(429, b"application/json", ERROR, b"Retry-After: 1\r\n"))
            elif path == b"/v1/embeddings":
                writer.write(answer(200, b"application/json", EMBED))
            elif b'"stream": true' in body:
                writer.write(answer(200, b"text/event-stream", SSE))
            else:
                writer.write(answer(200, b"application/json", CHAT))
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()


async def serve_flaky(port: int) -> None:
    server = await asyncio.start_server(flaky_connection, "127.0.0.1", port, backlog=1024)
    async with server:
        await server.serve_forever()


# --- processes -----------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@contextlib.contextmanager
def started(args: list[str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """Run ``args`` (output to ``log``); on exit TERM it by its PID, then KILL after 5 s."""
    with log.open("wb") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
    try:
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def wait_ready(
    ready: Callable[[], bool], proc: subprocess.Popen[bytes], log: Path, seconds: float = 30
) -> None:
    deadline = time.monotonic() + seconds
    while not ready():
        if proc.poll() is not None:
            sys.exit(f"{proc.args!r}: exited during start-up:\n{log.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            sys.exit(f"{proc.args!r}: not ready after {seconds:g} s:\n{log.read_text()[-3000:]}")
        time.sleep(0.1)


def accepts(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return False
    return True


def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as resp:
        return json.loads(resp.read())


def answers(url: str) -> bool:
    try:
        get_json(url)
    except OSError:
        return False
    return True


def config(nexus: int, mock: int, flaky: int) -> str:
    return f"""[server]
port = {nexus}
[discovery]
enabled = false
interfaces = ["127.0.0.1"]
[health_check]
interval_seconds = 5
[routing]
strategy = "round_robin"
[[backends]]
name = "mock"
url = "http://127.0.0.1:{mock}"
type = "vllm"
[[backends]]
name = "flaky"
url = "http://127.0.0.1:{flaky}"
type = "vllm"
"""


def report(tally: Tally, rss: list[int], start_kib: int, end_kib: int, seconds: float) -> None:
    print(f"\n{tally.done} requests in {seconds:.1f} s ({tally.done / seconds:.0f} req/s)")
    print("status counts:")
    for label, count in sorted(tally.statuses.items()):
        print(f"  {label:<40} {count:>8}")
    base = rss[WARMUP // REPORT_EVERY - 1] if len(rss) >= WARMUP // REPORT_EVERY else start_kib
    print(
        f"Nexus RSS: {start_kib / 1024:.1f} MiB before the load, {base / 1024:.1f} MiB after "
        f"{min(WARMUP, tally.done)} requests (warm-up), {end_kib / 1024:.1f} MiB at the end, "
        f"max {max([*rss, end_kib]) / 1024:.1f} MiB; growth after warm-up "
        f"{(end_kib - base) / 1024:+.1f} MiB"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=100_000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--flaky-upstream", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.flaky_upstream:
        uvloop.run(serve_flaky(args.flaky_upstream))
        return 0

    work = Path(tempfile.mkdtemp(prefix="nexus-soak."))
    mock_port, flaky_port, nexus_port = free_port(), free_port(), free_port()
    url = f"http://127.0.0.1:{nexus_port}"
    (work / "nexus.toml").write_text(config(nexus_port, mock_port, flaky_port))
    py = sys.executable
    with (
        started([py, "bench/mock_upstream.py", str(mock_port)], work / "mock.log") as mock,
        started([py, __file__, "--flaky-upstream", str(flaky_port)], work / "flaky.log") as flaky,
    ):
        wait_ready(lambda: accepts(mock_port), mock, work / "mock.log")
        wait_ready(lambda: accepts(flaky_port), flaky, work / "flaky.log")
        nexus_args = [str(NEXUS), "serve", "--config", str(work / "nexus.toml")]
        with started([*nexus_args, "--log-level", "warning"], work / "nexus.log") as nexus:
            wait_ready(lambda: answers(url + "/readyz"), nexus, work / "nexus.log")
            print(
                f"soak: {args.requests} requests, concurrency {args.concurrency}, Nexus PID "
                f"{nexus.pid} on {url}; logs in {work}",
                flush=True,
            )
            start_kib = rss_kib(nexus.pid)
            began = time.perf_counter()
            tally, rss = uvloop.run(load(url, args.requests, args.concurrency, nexus.pid))
            seconds = time.perf_counter() - began
            end_kib = rss_kib(nexus.pid)
            stats = get_json(url + "/v1/stats")
    report(tally, rss, start_kib, end_kib, seconds)
    in_flight = int(stats["in_flight"])
    print(f"in flight at the end: {in_flight}; requests each backend served in the end:")
    for row in stats["backends"]:
        print(
            f"  {row['name']:<8} {row['status']:<10} served {row.get('requests', 0):>7}  "
            f"errors {row.get('errors', 0):>6}"
        )
    failed_over = (work / "nexus.log").read_text().count("backend flaky failed")
    print(f"attempts on the flaky backend that failed and moved on (Nexus's log): {failed_over}")
    if tally.unexpected:
        print("UNEXPECTED: " + ", ".join(f"{k}: {n}" for k, n in tally.unexpected.items()))
    return 1 if tally.unexpected or in_flight else 0


if __name__ == "__main__":
    os.chdir(ROOT)
    sys.exit(main())
