"""Closed-loop throughput with wrk (a Python client cannot drive 3000+ req/s on 2 cores).

  python bench/throughput.py --url http://127.0.0.1:PORT [--auth KEY] [--cpu 0] --out FILE

Runs ``wrk -t1 -cC -d2s`` as a warm-up (discarded), then ``wrk -t1 -cC -dDs --latency`` with a
Lua script that POSTs a small chat completion, and writes req/s, latency percentiles and error
counts as JSON. wrk's tail latencies suffer from coordinated omission: read req/s, not p99.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from typing import Any

BODY = '{"model":"mock-model","messages":[{"role":"user","content":"hi"}]}'
UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0}


def lua_script(auth: str | None) -> str:
    lines = [
        'wrk.method = "POST"',
        f"wrk.body = '{BODY}'",
        'wrk.headers["Content-Type"] = "application/json"',
    ]
    if auth:
        lines.append(f'wrk.headers["Authorization"] = "Bearer {auth}"')
    return "\n".join(lines) + "\n"


def to_ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text)
    return float(m.group(1)) * UNITS[m.group(2)] if m else float("nan")


def parse_wrk(out: str) -> dict[str, Any]:
    def grab(pattern: str) -> str | None:
        m = re.search(pattern, out, re.MULTILINE)
        return m.group(1) if m else None

    socket = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    return {
        "req_per_s": float(grab(r"^Requests/sec:\s+([\d.]+)") or "nan"),
        "requests": int(grab(r"^\s+(\d+) requests in") or 0),
        "p50_ms": to_ms(grab(r"^\s+50%\s+(\S+)") or ""),
        "p99_ms": to_ms(grab(r"^\s+99%\s+(\S+)") or ""),
        "non_2xx": int(grab(r"Non-2xx or 3xx responses: (\d+)") or 0),
        "socket_errors": sum(int(x) for x in socket.groups()) if socket else 0,
    }


def run_wrk(args: argparse.Namespace, script: str, seconds: float, latency: bool) -> str:
    cmd = ["wrk", "-t1", f"-c{args.connections}", f"-d{seconds:g}s", "--timeout", "5s"]
    cmd += ["--latency"] if latency else []
    cmd += ["-s", script, args.url.rstrip("/") + "/v1/chat/completions"]
    if args.cpu is not None and shutil.which("taskset"):
        cmd = ["taskset", "-c", str(args.cpu), *cmd]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 30, check=True)
    return done.stdout


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--url", required=True, help="base URL, e.g. http://127.0.0.1:18500")
    p.add_argument("--auth", help="bearer token (a Nexus client key, the LiteLLM master key)")
    p.add_argument("--connections", type=int, default=50)
    p.add_argument("--seconds", type=float, default=8.0)
    p.add_argument("--warmup-seconds", type=float, default=2.0)
    p.add_argument("--cpu", type=int, help="pin wrk to this CPU with taskset")
    p.add_argument("--out", help="write the JSON here instead of stdout")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    if not shutil.which("wrk"):
        sys.exit("wrk is not installed (apt-get install -y wrk)")
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
        f.write(lua_script(args.auth))
    try:
        if args.warmup_seconds > 0:
            run_wrk(args, f.name, args.warmup_seconds, latency=False)
        raw = run_wrk(args, f.name, args.seconds, latency=True)
    finally:
        os.unlink(f.name)
    result = {"connections": args.connections, "seconds": args.seconds, **parse_wrk(raw)}
    text = json.dumps(result, indent=2)
    if args.out:
        with open(args.out, "w") as out:
            out.write(text + "\n")
    else:
        print(text)


if __name__ == "__main__":
    main()
