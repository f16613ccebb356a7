"""What a client key adds to a request, in CPU time: the steps the middleware runs for a keyed
request (find the key by its hash, admit it against rpm/tpm, the x-ratelimit-* headers on the
answer, the call in flight given back at the end, its usage counted from its outcome), as
``api/middleware.py`` and the telemetry call them, on a real key ring with a SQLite store.
Each step is also timed alone, to say where the time goes.

    python bench/keys.py [--requests 50000]

Prints microseconds of CPU per keyed request (the budget for the whole of auth is 20 µs of added
latency at c=1) and per step.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from nexus.api.auth import Auth, _sent
from nexus.config import ConfiguredKey
from nexus.keys.ring import KeyRing
from nexus.keys.tokens import hash_of, new_secret
from nexus.state.sqlite import SQLiteStore
from nexus.telemetry.outcomes import Trace, outcome_of

PATH = "/v1/chat/completions"
INFERENCE = {PATH, "/v1/embeddings", "/v1/messages", "/v1/responses"}


def scope_for(secret: str) -> dict[str, object]:
    """The headers an OpenAI SDK sends, as uvicorn hands them over."""
    headers = [
        (b"host", b"127.0.0.1:8000"),
        (b"accept-encoding", b"gzip, deflate"),
        (b"connection", b"keep-alive"),
        (b"accept", b"application/json"),
        (b"content-type", b"application/json"),
        (b"user-agent", b"OpenAI/Python 1.54.0"),
        (b"x-stainless-lang", b"python"),
        (b"authorization", f"Bearer {secret}".encode()),
        (b"content-length", b"67"),
    ]
    return {"type": "http", "method": "POST", "path": PATH, "headers": headers}


def per_call(fn: Callable[[], object], n: int) -> float:
    """CPU µs per call of fn, over n calls."""
    cpu = time.process_time()
    for _ in range(n):
        fn()
    return (time.process_time() - cpu) / n * 1e6


async def run(requests: int, directory: Path) -> dict[str, float]:
    secret = new_secret()
    entry = ConfiguredKey(name="bench", hash=hash_of(secret), rpm=10_000_000, tpm=10_000_000_000)
    ring = KeyRing([entry])
    store = SQLiteStore(directory / "state.db")
    await ring.attach(store)
    auth = Auth(ring, INFERENCE)
    scope = scope_for(secret)
    trace = Trace(prompt_tokens=5, completion_tokens=4, client_key=ring.find(secret))
    outcome = [outcome_of(trace, "bench", 200, 1.0)]

    def whole() -> None:  # what middleware.__call__ and _serve add for a keyed request
        if scope["path"] in auth.paths:  # middleware._keyed
            key = auth.identify(scope)
            if scope["path"] in auth.inference:
                auth.admit(key)  # counts the request and makes its x-ratelimit-* header lines
            key.window.in_flight -= 1  # _serve's finally
            ring.count(outcome)  # the telemetry's batch (the mock's usage: 5 + 4 tokens)

    whole()
    out = {"whole": per_call(whole, requests)}
    key = ring.find(secret)
    assert key is not None
    steps: dict[str, Callable[[], object]] = {
        "_sent (read the headers)": lambda: _sent(scope["headers"]),  # type: ignore[arg-type]
        "hash_of (sha256)": lambda: hash_of(secret),
        "ring.find (hash, lookup, compare)": lambda: ring.find(secret),
        "auth.identify": lambda: auth.identify(scope),
        "window.admit (and its header lines)": lambda: key.window.admit(ring.clock()),
        "window.head (header lines, uncounted)": lambda: key.window.head(ring.clock()),
        "ring.count (one outcome)": lambda: ring.count(outcome),
    }
    for name, fn in steps.items():
        out[name] = per_call(fn, requests)
    await ring.aclose()
    store.close()
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=50_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as directory:
        got = asyncio.run(run(args.requests, Path(directory)))
    print(f"client key per keyed request: {got.pop('whole'):.2f} µs CPU over {args.requests} "
          "requests (budget for auth's added latency: 20 µs)")  # fmt: skip
    for name, us in got.items():
        print(f"  {name:<36} {us:6.2f} µs")


if __name__ == "__main__":
    main()
