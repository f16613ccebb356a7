"""Latency measurements with an aiohttp client on uvloop. Each subcommand writes one JSON object.

  latency  added latency at concurrency 1: sequential requests in interleaved rounds, direct to
           the mock vs through a gateway (cuihuan/llm-gateway-bench method, more samples)
  sse      time to the first ``data:`` event of a stream, N concurrent clients for T seconds

Every run is bounded in time and in request count; URLs are expected to be on loopback.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from collections.abc import Sequence
from typing import Any

import aiohttp
import uvloop

PATH = "/v1/chat/completions"
BODY = b'{"model":"mock-model","messages":[{"role":"user","content":"hi"}]}'
STREAM_BODY = b'{"model":"mock-model","stream":true,"messages":[{"role":"user","content":"hi"}]}'
EXPECTED_EVENTS = 7  # 6 chunks + [DONE], as the mock sends them


def pct(samples: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of samples; NaN when there are none."""
    if not samples:
        return float("nan")
    ordered = sorted(samples)
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


def headers(auth: str | None) -> dict[str, str]:
    h = {"Content-Type": "application/json"}
    if auth:
        h["Authorization"] = f"Bearer {auth}"
    return h


def session(limit: int) -> aiohttp.ClientSession:
    timeout = aiohttp.ClientTimeout(total=30)
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=limit), timeout=timeout)


async def one_request(s: aiohttp.ClientSession, url: str, h: dict[str, str]) -> float | None:
    """Milliseconds for one non-streaming call with the body read; None on a non-200 or error."""
    t0 = time.perf_counter()
    try:
        async with s.post(url, data=BODY, headers=h) as r:
            await r.read()
            ok = r.status == 200
    except (TimeoutError, aiohttp.ClientError):
        return None
    return (time.perf_counter() - t0) * 1000 if ok else None


async def latency(args: argparse.Namespace) -> dict[str, Any]:
    targets = {
        "direct": (args.direct + PATH, headers(None)),
        "via": (args.via + PATH, headers(args.auth)),
    }
    sessions = {name: session(1) for name in targets}  # one keep-alive connection per target
    samples: dict[str, list[float]] = {name: [] for name in targets}
    round_medians: dict[str, list[float]] = {name: [] for name in targets}
    errors = {name: 0 for name in targets}
    deadline = time.monotonic() + args.max_seconds
    try:
        for name, (url, h) in targets.items():
            for _ in range(args.warmup):
                await one_request(sessions[name], url, h)
        for i in range(args.rounds):
            order = ["direct", "via"] if i % 2 == 0 else ["via", "direct"]
            for name in order:
                url, h = targets[name]
                got: list[float] = []
                for _ in range(args.per_round):
                    ms = await one_request(sessions[name], url, h)
                    if ms is None:
                        errors[name] += 1
                    else:
                        got.append(ms)
                samples[name] += got
                if got:
                    round_medians[name].append(statistics.median(got))
            if time.monotonic() > deadline:
                break
    finally:
        for s in sessions.values():
            await s.close()
    rounds = min(len(round_medians["direct"]), len(round_medians["via"]))
    deltas = [round_medians["via"][i] - round_medians["direct"][i] for i in range(rounds)]
    out: dict[str, Any] = {"rounds": rounds, "per_round": args.per_round, "errors": errors}
    for name, xs in samples.items():
        out[name] = {
            "n": len(xs),
            "p50": pct(xs, 50),
            "p99": pct(xs, 99),
            "median_of_round_medians": statistics.median(round_medians[name] or [float("nan")]),
        }
    q = statistics.quantiles(deltas, n=4) if len(deltas) >= 2 else [float("nan")] * 3
    out["added"] = {
        "p50": statistics.median(deltas) if deltas else float("nan"),
        "p99": out["via"]["p99"] - out["direct"]["p99"],
        "iqr": q[2] - q[0],
    }
    return out


async def one_stream(
    s: aiohttp.ClientSession, url: str, h: dict[str, str]
) -> tuple[float, float, int] | None:
    """(ms to first data event, ms to end, number of data events) or None on a failure."""
    t0 = time.perf_counter()
    ttfb = -1.0
    events = 0
    try:
        async with s.post(url, data=STREAM_BODY, headers=h) as r:
            if r.status != 200:
                await r.read()
                return None
            async for line in r.content:
                if line.startswith(b"data:"):
                    if events == 0:
                        ttfb = (time.perf_counter() - t0) * 1000
                    events += 1
    except (TimeoutError, aiohttp.ClientError):
        return None
    return (ttfb, (time.perf_counter() - t0) * 1000, events) if events else None


async def sse(args: argparse.Namespace) -> dict[str, Any]:
    url, h = args.url + PATH, headers(args.auth)
    ttfb: list[float] = []
    total: list[float] = []
    errors = 0
    short = 0  # streams that ended without all the expected events

    async def worker(s: aiohttp.ClientSession, until: float, record: bool) -> None:
        nonlocal errors, short
        while time.monotonic() < until and len(ttfb) < args.max_streams:
            got = await one_stream(s, url, h)
            if not record:
                continue
            if got is None:
                errors += 1
                continue
            ttfb.append(got[0])
            total.append(got[1])
            short += got[2] != EXPECTED_EVENTS

    async with session(args.concurrency) as s:
        warm = time.monotonic() + args.warmup_seconds
        await asyncio.gather(*(worker(s, warm, False) for _ in range(args.concurrency)))
        start = time.monotonic()
        until = start + args.seconds
        await asyncio.gather(*(worker(s, until, True) for _ in range(args.concurrency)))
        elapsed = time.monotonic() - start
    return {
        "concurrency": args.concurrency,
        "seconds": round(elapsed, 2),
        "streams": len(ttfb),
        "streams_per_s": len(ttfb) / elapsed,
        "ttfb_p50": pct(ttfb, 50),
        "ttfb_p99": pct(ttfb, 99),
        "total_p50": pct(total, 50),
        "total_p99": pct(total, 99),
        "errors": errors,
        "incomplete": short,
    }


def parse(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    lat = sub.add_parser("latency", help="added latency at concurrency 1")
    lat.add_argument("--direct", required=True, help="mock base URL, e.g. http://127.0.0.1:18100")
    lat.add_argument("--via", required=True, help="gateway base URL")
    lat.add_argument("--warmup", type=int, default=15)
    lat.add_argument("--rounds", type=int, default=9)
    lat.add_argument("--per-round", type=int, default=200)
    lat.add_argument("--max-seconds", type=float, default=60.0, help="stop after the round")
    st = sub.add_parser("sse", help="SSE time to first event")
    st.add_argument("--url", required=True, help="base URL")
    st.add_argument("--concurrency", type=int, default=10)
    st.add_argument("--seconds", type=float, default=5.0)
    st.add_argument("--warmup-seconds", type=float, default=0.5)
    st.add_argument("--max-streams", type=int, default=200_000)
    for sp in (lat, st):
        sp.add_argument("--auth", help="bearer token: a Nexus client key, the LiteLLM master key")
        sp.add_argument("--out", help="write the JSON here instead of stdout")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse(sys.argv[1:] if argv is None else argv)
    result = uvloop.run(latency(args) if args.cmd == "latency" else sse(args))
    text = json.dumps(result, indent=2)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    else:
        print(text)


if __name__ == "__main__":
    main()
