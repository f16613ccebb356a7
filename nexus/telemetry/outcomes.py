"""What each request did, recorded once and consumed off the request path.

A ``Trace`` travels with a request (dispatch fills it in: backend, route reason, attempts, time to
first token, tokens, time spent upstream, the planner's stage timings). When the response is done
the middleware turns it into an ``Outcome`` and hands it to ``Telemetry.record``, which only
appends to a buffer. A callback scheduled on the loop drains the buffer in batches into the
metrics, the stats, the history ring and any subscribers (the dashboard). Nothing polls: with no
traffic, nothing runs. Message content is never recorded.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

DRAIN_DELAY = 0.02  # seconds an outcome may wait so that several are consumed together


@dataclass(slots=True)
class Trace:
    kind: str = "chat"
    api: str = "chat"  # the API the client spoke: chat, messages, responses (embeddings: chat)
    model: str = ""
    stream: bool = False
    backend: str | None = None
    route_reason: str | None = None
    attempts: int = 0
    fallback_model: str | None = None
    ttft_ms: float | None = None
    upstream_ms: float = 0.0
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    error_type: str | None = None
    stage_ns: dict[str, int] = field(default_factory=dict)
    exclusions: dict[str, int] = field(default_factory=dict)  # stage -> backends left out
    # The last message's text, only with [logging] enable_content_logging = true; it goes to
    # the log line and nowhere else (not to history, metrics or the dashboard).
    content: str | None = None
    cost_usd: float | None = None  # what the request cost, when its backend is priced
    last_usage: Any = None  # the backend's last usage object, for the cost
    # The client's key (keys.ring.ClientKey) when [auth] is on: dispatch reads its reach and
    # budget; only its name is recorded.
    client_key: Any = None
    admitted: bool = True  # False: the key's own limits refused it before it was served
    # With the shared store: the key whose rate admission waits for dispatch (one round trip
    # with the budget), the rate-limit header lines it earned, whether it holds a slot of the
    # key's shared count, and the share window that admitted it while Redis was away.
    pending: Any = None
    rate: bytes = b""
    held: bool = False
    local: Any = None

    def usage(self, usage: Any) -> None:
        if isinstance(usage, dict):
            self.last_usage = usage
            prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
            self.prompt_tokens = prompt if isinstance(prompt, int) else self.prompt_tokens
            if isinstance(completion, int):
                self.completion_tokens = completion


@dataclass(frozen=True, slots=True)
class Outcome:
    time: float  # unix seconds, when the request ended
    request_id: str
    kind: str
    model: str
    backend: str | None
    status: int
    duration_ms: float
    ttft_ms: float | None
    upstream_ms: float
    prompt_tokens: int | None
    completion_tokens: int | None
    route_reason: str | None
    attempts: int
    stream: bool
    fallback_model: str | None
    error_type: str | None
    stage_ns: dict[str, int]
    exclusions: dict[str, int]
    cost_usd: float | None = None
    api: str = "chat"
    key: str | None = None  # the client key's name, when [auth] is on
    admitted: bool = True  # counted in the key's usage (its limits did not refuse it)

    @property
    def ok(self) -> bool:
        return self.status < 400 and self.error_type is None

    def public(self) -> dict[str, Any]:
        """The history entry: everything but the planner internals."""
        entry = asdict(self)
        del entry["stage_ns"], entry["exclusions"], entry["admitted"]
        entry["duration_ms"] = round(self.duration_ms, 3)
        entry["upstream_ms"] = round(self.upstream_ms, 3)
        if self.ttft_ms is not None:
            entry["ttft_ms"] = round(self.ttft_ms, 3)
        if self.cost_usd is not None:
            entry["cost_usd"] = round(self.cost_usd, 8)
        return entry


def outcome_of(
    trace: Trace, request_id: str, status: int, duration_ms: float, now: float | None = None
) -> Outcome:
    return Outcome(
        time=time.time() if now is None else now,
        request_id=request_id,
        kind=trace.kind,
        model=trace.model,
        backend=trace.backend,
        status=status,
        duration_ms=duration_ms,
        ttft_ms=trace.ttft_ms,
        upstream_ms=trace.upstream_ms,
        prompt_tokens=trace.prompt_tokens,
        completion_tokens=trace.completion_tokens,
        route_reason=trace.route_reason,
        attempts=trace.attempts,
        stream=trace.stream,
        fallback_model=trace.fallback_model,
        error_type=trace.error_type or (None if status < 400 else f"http_{status}"),
        stage_ns=trace.stage_ns,
        exclusions=trace.exclusions,
        cost_usd=trace.cost_usd,
        api=trace.api,
        key=trace.client_key.name if trace.client_key is not None else None,
        admitted=trace.admitted,
    )


Consumer = Callable[[list[Outcome]], None]


class Telemetry:
    """The outcome buffer and its consumers (metrics, stats, history, subscribers)."""

    def __init__(self, consumers: list[Consumer]) -> None:
        self._buffer: deque[Outcome] = deque()
        self._consumers = consumers
        self._scheduled = False

    def record(self, outcome: Outcome) -> None:
        self._buffer.append(outcome)
        if not self._scheduled:
            self._scheduled = True
            try:
                asyncio.get_running_loop().call_later(DRAIN_DELAY, self.drain)
            except RuntimeError:  # no loop (a tool or a test): consume now
                self.drain()

    def drain(self) -> None:
        """Hand every buffered outcome to the consumers (also called at shutdown)."""
        self._scheduled = False
        if not self._buffer:
            return
        batch = list(self._buffer)
        self._buffer.clear()
        for consume in self._consumers:
            consume(batch)

    def subscribe(self, consumer: Consumer) -> Callable[[], None]:
        self._consumers.append(consumer)
        return lambda: self._consumers.remove(consumer)
