"""What sharing the state through Redis adds to a limited, priced request (issue 13, point 6).

  python bench/replicas.py --base BASE.toml [--rounds 21] [--per-round 200] [--pin 1]
                           [--redis-pin 0] [--out FILE]

Two ``nexus serve`` processes from the same base config (its backend the bench's mock upstream):
one with the embedded SQLite store, one with ``[state] backend = "redis"`` on a ``redis-server``
this script starts on a loopback port. Both have the same client key (``rpm``, ``tpm`` and a
``monthly_budget_usd`` too high to be met) and every request is priced under a monthly limit that
blocks (``block_all``): each request takes the whole path, and on the Redis side that is one
round trip (the admission script; tests/replicas counts it with MONITOR). Sequential keep-alive
requests, A and B in ABBA rounds. The reference is the round trip a request makes: the admission
script alone, from an event loop as Nexus makes it (its own client, c=1, pinned to the gateways'
CPU), measured after each round (this machine's speed drifts within a run) in two ways: back to
back (Redis never idles: a hotter loop than any request makes), and paced, each call after the CPU
was busy for as long as a request of that round took (Redis idles between two calls, as it does
between two requests at c=1; waking an idle CPU is part of a round trip on a VM). At the end: a
script that does nothing and a bare PING on a blocking socket, for scale. "added"
is the median of the per-round differences B - A; the verdict is on the median, per round, of
B - A less the paced round trip measured after it: the Redis path adds at most the one round trip
it makes. The margin over the back-to-back round trip is reported too.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
NEXUS = Path(sys.executable).parent / "nexus"
BODY = b'{"model":"mock-model","messages":[{"role":"user","content":"hi"}],"max_tokens":16}'
_LENGTH = re.compile(rb"content-length: (\d+)", re.IGNORECASE)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def pinned(cmd: list[str], cpu: int | None) -> list[str]:
    return ["taskset", "-c", str(cpu), *cmd] if cpu is not None and shutil.which("taskset") else cmd


class Client:
    """One keep-alive connection, requests as prepared bytes (little client-side noise)."""

    def __init__(self, port: int, key: str) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.request = (
            f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            f"Authorization: Bearer {key}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(BODY)}\r\n\r\n"
        ).encode() + BODY

    def once(self) -> float:
        """One request; seconds until its whole answer is in."""
        started = time.perf_counter()
        self.sock.sendall(self.request)
        data = b""
        while True:
            data += self.sock.recv(65536)
            end = data.find(b"\r\n\r\n")
            if end < 0:
                continue
            if not data.startswith(b"HTTP/1.1 200"):
                raise RuntimeError(f"not 200: {data[:300]!r}")
            length = _LENGTH.search(data, 0, end)
            if length and len(data) >= end + 4 + int(length.group(1)):
                return time.perf_counter() - started


def start(cmd: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    with open(log, "ab") as out:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)


def wait_port(port: int, proc: subprocess.Popen[bytes], what: str, log: Path) -> None:
    deadline = time.monotonic() + 30
    while True:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not start:\n{log.read_text()[-3000:]}")
        time.sleep(0.05)


def redis_round_trips(port: int, count: int) -> dict[str, float]:
    """Round trips from an event loop, as Nexus makes them (its own client, c=1). First, for
    each line ``N GAP_US`` read from stdin until it closes, the medians of N round trips of the
    admission script (a bench key's arguments, under another prefix) back to back and each after
    GAP_US of busy CPU, printed as one JSON line (the rounds' reference, measured beside them).
    Then the median µs of a script that does nothing and of a bare PING on a blocking socket."""
    import uvloop

    from nexus.state.redis import RedisTarget
    from nexus.state.redis_gate import RedisGate
    from nexus.state.resp import Script

    async def timed(call: Any, count: int, warm: int = 200, gap: float = 0.0) -> float:
        """Median of ``count`` calls; ``gap``: seconds of busy CPU before each (as a request
        keeps the gateway busy between two admissions while Redis idles)."""
        for _ in range(warm):
            await call()
        times = []
        for _ in range(count):
            if gap:
                until = time.perf_counter() + gap
                while time.perf_counter() < until:
                    pass
            started = time.perf_counter()
            await call()
            times.append(time.perf_counter() - started)
        return statistics.median(times) * 1e6

    async def scripted() -> float:
        target = RedisTarget("127.0.0.1", port, 0, False, None, None, "bench")
        gate = RedisGate(target, "bench-rtt:", "bench")
        await gate.renew({"reserved": [], "keyres": [], "conc": []})
        month = time.strftime("%Y-%m", time.gmtime())
        limits = (10_000_000, 10_000_000_000, 0)

        def admission() -> Any:
            return gate.answer(gate.ask(month, "k", limits, 1000, 10**15, 10**15))

        loop = asyncio.get_running_loop()
        while line := await loop.run_in_executor(None, sys.stdin.readline):
            calls, gap_us = line.split()
            back_to_back = await timed(admission, int(calls), warm=50)
            paced = await timed(admission, int(calls), warm=5, gap=float(gap_us) / 1e6)
            print(json.dumps([back_to_back, paced]), flush=True)
        noop = Script("return 1")
        bare = await timed(lambda: gate._client.run(noop), count)
        await gate.aclose()
        return bare

    bare = uvloop.run(scripted())
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        raw = []
        for _ in range(count):
            started = time.perf_counter()
            sock.sendall(b"PING\r\n")
            sock.recv(64)
            raw.append(time.perf_counter() - started)
    return {"noop_script_us": bare, "raw_ping_us": statistics.median(raw) * 1e6}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--base", help="base config: server, discovery, mock backend (required)")
    p.add_argument("--rounds", type=int, default=21)
    p.add_argument("--per-round", type=int, default=200)
    p.add_argument("--warmup", type=int, default=300)
    p.add_argument("--pin", type=int, help="CPU for both gateways")
    p.add_argument("--redis-pin", type=int, help="CPU for Redis (with the load, like the mock)")
    p.add_argument("--out", help="write the JSON here instead of stdout")
    p.add_argument("--rtt", type=int, help=argparse.SUPPRESS)  # internal: only round trips
    args = p.parse_args()
    if args.rtt:
        print(json.dumps(redis_round_trips(args.rtt, 2000)))
        return
    if not args.base:
        p.error("--base is required")
    redis_server = shutil.which("redis-server")
    if redis_server is None:
        print(json.dumps({"skipped": "redis-server is not installed"}))
        return
    from nexus.keys.tokens import hash_of, new_secret

    work = Path(tempfile.mkdtemp(prefix="nexus-bench-replicas-"))
    key = new_secret()
    base = re.sub(r"(?m)^port = \d+\n", "", Path(args.base).read_text())
    common = (
        "[[pricing]]\nmodel_pattern = '*'\ninput_per_mtok = 1.0\noutput_per_mtok = 2.0\n"
        "[routing.budget]\nmonthly_limit_usd = 1000000.0\nhard_limit_action = 'block_all'\n"
        f"[auth]\nenabled = true\n[[auth.keys]]\nname = 'bench'\nhash = '{hash_of(key)}'\n"
        "rpm = 10000000\ntpm = 10000000000\nmonthly_budget_usd = 1000000.0\n"
    )
    redis_port = free_port()
    stores = {
        "sqlite": f"[state]\npath = '{work / 'state.db'}'\n",
        "redis": f"[state]\nbackend = 'redis'\nredis_url = 'redis://127.0.0.1:{redis_port}/0'\n",
    }
    procs: list[subprocess.Popen[Any]] = []
    try:
        redis_log = work / "redis.log"
        procs.append(start(pinned([redis_server, "--port", str(redis_port), "--bind",
                                   "127.0.0.1", "--save", "", "--appendonly", "no", "--dir",
                                   str(work)], args.redis_pin), redis_log))  # fmt: skip
        wait_port(redis_port, procs[-1], "redis-server", redis_log)
        ports = {}
        env = {k: v for k, v in os.environ.items() if not k.startswith("NEXUS_")}
        for name, store in stores.items():
            config = work / f"{name}.toml"
            config.write_text(base + common + store)
            ports[name] = free_port()
            log = work / f"{name}.log"
            cmd = [str(NEXUS), "serve", "-c", str(config), "-p", str(ports[name]),
                   "--log-level", "warning"]  # fmt: skip
            procs.append(start(pinned(cmd, args.pin), log, env))
            wait_port(ports[name], procs[-1], f"nexus ({name})", log)
        clients = {name: Client(port, key) for name, port in ports.items()}
        for client in clients.values():
            for _ in range(args.warmup):
                client.once()
        # the reference: the admission's round trip from the gateways' CPU, measured after each
        # round (a round trip between two CPUs costs more than one within a CPU on a VM: the one
        # a gateway makes crosses)
        helper = subprocess.Popen(
            pinned([sys.executable, __file__, "--rtt", str(redis_port)], args.pin),
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        procs.append(helper)

        def round_trip(gap: float) -> tuple[float, float]:
            """The admission's round trip back to back, and paced: each after ``gap`` seconds
            of busy CPU (Redis idle meanwhile, as between two requests at c=1)."""
            assert helper.stdin is not None and helper.stdout is not None
            helper.stdin.write(f"{args.per_round} {gap * 1e6:.0f}\n")
            helper.stdin.flush()
            back_to_back, paced = json.loads(helper.stdout.readline())
            return back_to_back, paced

        round_trip(0.0005)  # (its warm-up)
        deltas: list[float] = []
        margins: list[float] = []  # added - the round trip back to back, per round
        paced_margins: list[float] = []  # added - the round trip at the requests' pace
        trips_us: list[float] = []
        paced_us: list[float] = []
        medians: dict[str, list[float]] = {"sqlite": [], "redis": []}
        requests = 0
        for index in range(args.rounds):
            order = ("sqlite", "redis") if index % 2 == 0 else ("redis", "sqlite")
            got = {}
            for name in order:
                got[name] = statistics.median(clients[name].once() for _ in range(args.per_round))
                medians[name].append(got[name])
            requests += args.per_round
            deltas.append(got["redis"] - got["sqlite"])
            back_to_back, paced = round_trip(got["sqlite"])  # a request's time: Redis's idle
            trips_us.append(back_to_back)
            paced_us.append(paced)
            margins.append(deltas[-1] * 1e6 - back_to_back)
            paced_margins.append(deltas[-1] * 1e6 - paced)
        assert helper.stdin is not None and helper.stdout is not None
        helper.stdin.close()
        trips = json.loads(helper.stdout.read().strip().splitlines()[-1])
        helper.wait(timeout=120)
        added = statistics.median(deltas) * 1e6
        margin = statistics.median(margins)
        paced_margin = statistics.median(paced_margins)
        result: dict[str, Any] = {
            "sqlite_p50_ms": statistics.median(medians["sqlite"]) * 1e3,
            "redis_p50_ms": statistics.median(medians["redis"]) * 1e3,
            "redis_added_us": added,
            "admission_round_trip_us": statistics.median(trips_us),
            "added_minus_round_trip_us": margin,
            "paced_round_trip_us": statistics.median(paced_us),
            "added_minus_paced_round_trip_us": paced_margin,
            "noop_script_round_trip_us": trips["noop_script_us"],
            "raw_ping_us": trips["raw_ping_us"],
            "requests": requests,
            "rounds": args.rounds,
            "per_round": args.per_round,
            # the one round trip a request makes is its admission script's, to a Redis that
            # idled since the request before: per round, what Redis added, less that round trip
            # measured just after it (the back-to-back margin is reported beside it)
            "verdict": "PASS" if paced_margin <= 0 else "FAIL",
        }
        text = json.dumps(result, indent=2)
        if args.out:
            Path(args.out).write_text(text)
        else:
            print(text)
    finally:
        for proc in reversed(procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
