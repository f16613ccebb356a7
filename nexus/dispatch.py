"""The one path to a backend: walk the plan, call the adapter, fail over, keep counts straight.

Connection errors, timeouts, 5xx and 429 move on to the next step of the plan, up to
``max_retries`` more attempts; any other upstream 4xx goes back to the client as it came. A stream
commits to its backend at its first event, not its response headers: a backend that answers 200
and then stays silent or drops is left for the next step too. After the first event there is no
failover: a failure ends the stream with an error event and ``[DONE]``.

Only a connection that could not be made marks a backend down; a timeout is a slow answer, not an
outage, and counts against the backend's quality instead.

A step on a priced backend first reserves its worst-case cost in the ledger; a reservation the
budget refuses skips that step (stage ``budget``) as if the planner had left it out. The answer's
real cost settles the reservation when it ends: from the backend's usage, else (no usage, a
stream cut short, a client gone) from what is known to have been used.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Coroutine, Mapping
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import orjson

from .admission import Asking, SharedAdmission
from .backends import Adapter, Adapters, Call, Completion, Inbound, StartedStream

__all__ = ["Dispatcher", "Inbound", "Served", "StreamResult"]
from .backends.anthropic import AnthropicAdapter
from .backends.http1 import BEFORE_SEND
from .backends.sse import DONE, is_done
from .cost.ledger import Reservation
from .cost.meter import CostMeter, output_bound
from .cost.pricing import Price
from .dialects import anthropic_inbound
from .errors import (
    InvalidRequest,
    JSONDict,
    NexusError,
    NoHealthyBackend,
    QuotaSpent,
    RateLimited,
    Saturated,
    ServiceUnavailable,
    UpstreamConnectError,
    UpstreamError,
)
from .health import HealthChecker
from .keys.ring import ClientKey, KeyRing
from .keys.tokens import hash_of
from .queueing import QueueFull, RequestQueue
from .redact import scrub_bytes
from .registry import Backend, Registry
from .routing.access import Access
from .routing.affinity import affinity_keys
from .routing.planner import Exclusion, Plan, Router, RouteRequest, Step
from .routing.requirements import chat_requirements, embedding_requirements
from .telemetry.outcomes import Trace

log = logging.getLogger("nexus.dispatch")
FIRST_STEPS_MAX = 1024  # models whose first step is remembered (for the early admission)

Kind = Literal["chat", "embeddings"]
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Served:
    """Which backend answered and why: becomes the ``X-Nexus-*`` response headers."""

    step: Step
    route_reason: str
    attempts: int
    cost: float | None = None  # USD: the real cost, or a stream's worst case before it starts
    budget: tuple[tuple[bytes, bytes], ...] = ()  # X-Nexus-Budget-*, when not normal
    charge: Charge | None = None  # what a stream holds in the ledger until it ends

    def headers(self) -> list[tuple[bytes, bytes]]:
        backend = self.step.backend
        headers = [
            (b"x-nexus-backend", backend.name.encode()),
            (b"x-nexus-backend-type", backend.location.encode()),
            (b"x-nexus-route-reason", self.route_reason.encode()),
            (b"x-nexus-privacy-zone", backend.zone.encode()),
        ]
        if self.step.fallback is not None:
            headers.append((b"x-nexus-fallback-model", self.step.fallback.encode()))
        if self.cost is not None:
            headers.append((b"x-nexus-cost-estimated", f"{self.cost:.6f}".encode()))
        if self.budget:
            headers.extend(self.budget)
        return headers


@dataclass(slots=True)
class Charge:
    """A priced attempt: its price, its worst case and what it holds in the ledger."""

    price: Price
    worst: float
    reservation: Reservation | None
    settled: bool = False
    key: ClientKey | None = None  # the client key whose budget holds ``worst`` too
    key_refused: bool = False  # the key's monthly budget could not hold it


@dataclass(slots=True)
class Early:
    """A request's admission in the shared store, asked before its plan: for the step the
    model's requests went to first last time (its answer is read when the walk reaches a step;
    what it reserved is given back if that step is another)."""

    asking: Asking
    backend: Backend | None  # the step it was asked for (None: no budget guessed)
    model: str
    price: Price | None
    worst: float | None


class BudgetRefused(Exception):
    """The shared store refused a step's reservation (raised through its upstream request)."""

    def __init__(self, charge: Charge) -> None:
        super().__init__("the budget cannot hold this call's worst case")
        self.charge = charge


class Gate:
    """A step's admission in the shared store, awaited by its upstream request just before the
    request is written (``http1.BEFORE_SEND``); raises RateLimited, or BudgetRefused when the
    budget cannot hold the call. ``charge``: what it holds, once it has run."""

    __slots__ = ("_admission", "charge", "ran")

    def __init__(self, admission: Coroutine[Any, Any, Charge | None]) -> None:
        self._admission = admission
        self.charge: Charge | None = None
        self.ran = False

    async def __call__(self) -> None:
        if self.ran:
            return
        self.ran = True
        charge = self.charge = await self._admission
        if charge is not None and charge.reservation is None:
            raise BudgetRefused(charge)

    def close(self) -> None:
        self._admission.close()


def _unread(gate: Gate | None, asked: Early | None) -> Early | None:
    """The admission asked before the plan, when the step's gate never ran (no request was
    written): the next step reads it (or it is given back)."""
    if gate is None or gate.ran:
        return None
    gate.close()
    return asked


def charge_of(held: Charge | Gate | None) -> Charge | None:
    return held.charge if isinstance(held, Gate) else held


@dataclass(slots=True)
class StreamResult:
    served: Served
    events: AsyncGenerator[bytes, None]
    native: bool = False  # the events are in the client's own API, not OpenAI chunks


class Dispatcher:
    def __init__(
        self,
        registry: Registry,
        adapters: Adapters,
        health: HealthChecker,
        router: Router,
        *,
        queue: RequestQueue | None = None,
        max_wait_seconds: float = 30.0,
        max_retries: int = 2,
        clock: Callable[[], float] = time.monotonic,
        meter: CostMeter | None = None,
        keys: KeyRing | None = None,
        shared: SharedAdmission | None = None,
    ) -> None:
        self.meter = meter
        self.keys = keys
        self.shared = shared  # [state] backend = "redis": limits and budgets checked there
        # model -> the step its last request was charged for first, and whether the one before
        # went there too (only a steady route is guessed: a route that alternates is not)
        self._first: dict[str, tuple[Backend, str, bool]] = {}
        self.registry = registry
        self.adapters = adapters
        self.health = health
        self.router = router
        self.queue = queue
        self.max_wait = max_wait_seconds
        self.max_retries = max_retries
        self.clock = clock

    def route_request(
        self,
        kind: Kind,
        body: JSONDict,
        client: Mapping[str, str],
        size: int = 0,
        inbound: Inbound | None = None,
        access: ClientKey | None = None,
    ) -> RouteRequest:
        """What the router needs to know of a request: its model, needs and headers."""
        model = body["model"]
        flexible = (
            "x-nexus-strict" not in client
            and client.get("x-nexus-flexible", "").strip().lower() == "true"
        )
        if kind == "embeddings":
            needs = embedding_requirements(body, size)
            return RouteRequest(model, needs, flexible, access=access)
        keys: tuple[int, ...] = ()
        routing = self.router.routing
        if routing.affinity:  # replicas sharing the table need keys every process agrees on
            keys = tuple(affinity_keys(model, body["messages"], routing.shared_affinity))
        native = "anthropic" if inbound is not None and inbound.native is not None else None
        needs = chat_requirements(body, client, size)
        return RouteRequest(model, needs, flexible, keys, body, native, access)

    async def complete(
        self,
        kind: Kind,
        body: JSONDict,
        raw: bytes,
        client: Mapping[str, str],
        request_id: str,
        trace: Trace | None = None,
        inbound: Inbound | None = None,
    ) -> tuple[Completion, Served]:
        """A whole (non-streaming) answer from the first step of the plan that gives one.
        ``inbound``: what a request in another API carries beside its chat form."""
        trace = trace or Trace()
        request = self.route_request(kind, body, client, len(raw), inbound, trace.client_key)
        trace.kind = kind

        async def attempt(
            adapter: Adapter, step: Step, call: Call, held: Charge | Gate | None
        ) -> Completion:
            started = self.clock()
            try:
                if kind == "chat":
                    result = await adapter.chat(step.backend, call)
                else:
                    result = await adapter.embeddings(step.backend, call)
            except asyncio.CancelledError:
                # The client left: the prompt was sent and is billed; the answer is unknown.
                self._settle(charge_of(held), step, request, trace, None, output_tokens=0)
                raise
            except BaseException:
                self._release_charge(charge_of(held))
                raise
            finally:
                self._release(step.backend)
                trace.upstream_ms += (self.clock() - started) * 1000
            self._succeeded(step, request, (self.clock() - started) * 1000, None)
            trace.usage(result.usage)
            self._settle(charge_of(held), step, request, trace, result.usage)
            return result

        return await self._walk(request, body, raw, client, request_id, attempt, trace, inbound)

    async def stream(
        self,
        body: JSONDict,
        raw: bytes,
        client: Mapping[str, str],
        request_id: str,
        trace: Trace | None = None,
        inbound: Inbound | None = None,
    ) -> StreamResult:
        """Start a stream on the first step whose backend sends an event: that event is the
        commit point (the caller sends headers only then). The slot is held until the relay ends."""
        trace = trace or Trace()
        request = self.route_request("chat", body, client, len(raw), inbound, trace.client_key)

        async def attempt(
            adapter: Adapter, step: Step, call: Call, held: Charge | Gate | None
        ) -> StartedStream:
            try:
                return await adapter.open_stream(step.backend, call)
            except BaseException:
                self._release(step.backend)
                self._release_charge(charge_of(held))
                raise

        started = self.clock()
        upstream, served = await self._walk(
            request, body, raw, client, request_id, attempt, trace, inbound
        )
        trace.ttft_ms = (self.clock() - started) * 1000
        events = self._relay(
            upstream, served.step, request, request_id, started, trace, served.charge
        )
        return StreamResult(served, events, upstream.native)

    async def count_tokens(
        self, body: JSONDict, inbound: Inbound, access: Access | None = None
    ) -> int:
        """A Messages request's input tokens: Anthropic's own count when the model's first choice
        is an Anthropic backend, else (or if that count fails) Nexus's estimate. A client key's
        reach holds here too: a model it may not use is a 403, and a backend it may not reach
        never sees the prompt."""
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise InvalidRequest("'model' must be a non-empty string", param="model")
        if not isinstance(body.get("messages"), list):
            raise InvalidRequest("'messages' must be a list of messages", param="messages")
        try:
            plan = self.router.plan(RouteRequest(model, access=access))
        except NoHealthyBackend:
            return anthropic_inbound.estimate_input_tokens(body)  # nothing may count it for us
        step = plan.steps[0] if plan.steps else None
        adapter = self.adapters.for_type(step.backend.type) if step is not None else None
        if step is not None and isinstance(adapter, AnthropicAdapter):
            try:
                return await adapter.count_tokens(step.backend, step.model, body, inbound)
            except UpstreamError as exc:
                log.info("count_tokens: %s; answering with the estimate", exc)
        return anthropic_inbound.estimate_input_tokens(body)

    async def _plan(self, request: RouteRequest) -> tuple[Plan, bool]:
        """The plan; while every backend that could serve it is busy, wait in the queue and plan
        again. No overtaking: a new request that would take a backend someone in the model's
        line waits for waits behind them; one that a backend nobody waits for can serve (text
        while vision requests wait for the vision backend) goes at once."""
        plan = self.router.plan(request)
        queue = self.queue
        if plan.steps and (queue is None or not queue.depth):
            return plan, False  # the usual case: nobody waits
        free = [step.backend.name for step in plan.steps]
        key = plan.resolved
        if free and (queue is None or not queue.wanted(key, free)):
            return plan, False
        if not free and not plan.saturated:
            return plan, False
        context = plan.context(self.registry, [])
        retry_after = max(1, int(self.max_wait))
        if queue is None:
            raise Saturated(request.model, context, BUSY, retry_after)
        try:
            ticket = queue.join(key, high=request.requirements.high_priority, wants=waits_for(plan))
        except QueueFull:
            raise Saturated(request.model, context, BUSY + " and the queue is full", 1) from None
        served = False
        try:
            if free:
                queue.wake(free, key)  # a slot is free now: who waits for it goes first
            deadline = self.clock() + self.max_wait
            while True:
                remaining = deadline - self.clock()
                if remaining <= 0 or not await queue.wait(ticket, remaining):
                    raise Saturated(request.model, context, BUSY + QUEUE_TIMEOUT, retry_after)
                plan = self.router.plan(request)
                if plan.steps:
                    served = True
                    return plan, True
                queue.again(ticket, waits_for(plan))
        finally:
            queue.leave(ticket, served=served)

    async def _walk(
        self,
        request: RouteRequest,
        body: JSONDict,
        raw: bytes,
        client: Mapping[str, str],
        request_id: str,
        attempt: Callable[[Adapter, Step, Call, Charge | Gate | None], Awaitable[T]],
        trace: Trace,
        inbound: Inbound | None = None,
    ) -> tuple[T, Served]:
        """Try the plan's steps in order until one answers; ``attempt`` owns the in-flight slot
        taken here (it releases it when the answer is complete, or at once when it fails)."""
        # With the shared store, the admission goes before the plan (its round trip overlaps
        # planning); its answer is read at the first step.
        early = self._ask_early(request, trace) if self.shared is not None else None
        try:
            trace.model = request.model
            trace.stream = request.requirements.stream
            plan, queued = await self._plan(request)
            trace.stage_ns = plan.stage_ns
            for exclusion in plan.exclusions:
                trace.exclusions[exclusion.stage] = trace.exclusions.get(exclusion.stage, 0) + 1
            last: UpstreamError | None = None
            refused = key_refused = False
            tries = 0
            keyed = request.access is not None or self._sends_nexus_key(client)
            for index, step in enumerate(plan.steps):
                if tries > self.max_retries:
                    break
                adapter = self.adapters.for_type(step.backend.type)
                if adapter is None:
                    continue
                headers = upstream_headers(step, client, request_id, keyed)
                estimate = request.requirements.estimated_tokens
                call = Call(body, raw, step.model, headers, estimate, inbound)
                # With the shared store, the step's admission is awaited by its upstream request
                # just before it is written (``Gate``): all before that is made meanwhile.
                asked, early = early, None
                gate = None if self.shared is None else self._gate(step, request, trace, asked)
                charge = self._charge(step, request) if gate is None else None
                if charge is not None and charge.reservation is None:
                    # The budget cannot hold its worst case: as if planned out (not a try).
                    refused = True
                    key_refused = key_refused or charge.key_refused
                    plan.exclusions.append(budget_refusal(step, charge, request.access))
                    continue
                tries += 1
                trace.attempts = tries
                before, trace.backend = trace.backend, step.backend.name  # a failure is whose
                step.backend.in_flight += 1
                step.backend.total_requests += 1
                try:
                    result = await (
                        attempt(adapter, step, call, charge) if gate is None
                        else self._gated(attempt, adapter, step, call, trace, gate, before)
                    )  # fmt: skip
                except BudgetRefused as refusal:  # (the shared store's answer: not a try)
                    tries -= 1
                    refused = True
                    key_refused = key_refused or refusal.charge.key_refused
                    plan.exclusions.append(budget_refusal(step, refusal.charge, request.access))
                    continue
                except UpstreamError as exc:
                    self._failed(step, exc, request_id)
                    if not exc.retryable:
                        raise
                    last = exc
                    continue
                finally:
                    early = _unread(gate, asked)
                charge = charge if gate is None else gate.charge
                reason = "queued" if queued and index == 0 and step.fallback is None else None
                if refused and last is None and step.fallback is None:
                    reason = "budget-limit"  # the steps before were refused by the budget only
                # A stream's headers go before its usage: they carry its worst case.
                cost = None
                if charge is not None:
                    cost = charge.worst if request.requirements.stream else trace.cost_usd
                budget = self._budget_headers()
                served = Served(
                    step, reason or plan.route_reason(index), tries, cost, budget, charge
                )
                trace.backend, trace.route_reason = step.backend.name, served.route_reason
                trace.fallback_model = step.fallback
                return result, served
            raise self._unserved(plan, request, last, refused, key_refused)
        except NexusError as exc:
            self._tell_budget(exc)
            raise
        finally:
            self._unused(early, request)  # no step was reached

    async def _relay(
        self,
        upstream: StartedStream,
        step: Step,
        request: RouteRequest,
        request_id: str,
        started: float,
        trace: Trace,
        charge: Charge | None = None,
    ) -> AsyncGenerator[bytes, None]:
        """The first event, then the rest one for one; always ends with ``[DONE]``; releases
        the slot on exit and settles what the stream cost."""
        done = is_done(upstream.first)
        relayed = 1
        try:
            backend = step.backend
            # An error event from a backend with a key may echo it: masked like any other error.
            secrets = backend.secrets if backend.api_key or "@" in backend.url else None
            first = upstream.first
            if b'"usage":{' in first:
                trace.usage(_usage_of(first))
            yield scrub_bytes(first, secrets) if secrets and b'"error"' in first else first
            if not done:
                async for event in upstream.rest:
                    relayed += 1
                    if b'"usage":{' in event:
                        trace.usage(_usage_of(event))
                    if secrets and b'"error"' in event:
                        event = scrub_bytes(event, secrets)
                    yield event
                    if is_done(event):
                        done = True
                        break
            self._succeeded(step, request, (self.clock() - started) * 1000, trace.ttft_ms)
        except UpstreamError as exc:
            self._failed(step, exc, request_id, started=True)
            trace.error_type = "stream_broken"
            yield native_error_event(exc, request_id) if upstream.native else error_event(exc)
        finally:
            self._release(step.backend)
            trace.upstream_ms = (self.clock() - started) * 1000
            await upstream.aclose()
            if upstream.usage is not None:
                trace.usage(upstream.usage)
            if charge is not None:  # no usage (cut short): about a token per event relayed
                usage = upstream.usage if upstream.usage is not None else trace.last_usage
                self._settle(charge, step, request, trace, usage, output_tokens=relayed)
        if not done and not upstream.native:  # a provider's own stream has its own ending
            yield DONE

    def _sends_nexus_key(self, client: Mapping[str, str]) -> bool:
        """With ``[auth]`` off, a client may still send a Nexus key: it is not forwarded either
        (one hash, only when keys exist and the client sent a credential)."""
        keys = self.keys
        sent = client.get("authorization")
        if keys is None or not sent or not len(keys):
            return False
        scheme, _, token = sent.partition(" ")
        return scheme.lower() == "bearer" and keys.by_hash(hash_of(token.strip())) is not None

    def _charge(self, step: Step, request: RouteRequest) -> Charge | None:
        """Reserve the worst case of a call to a priced backend (None when it is free or
        nothing is priced)."""
        meter = self.meter
        price, worst = self._worst(step.backend, step.model, request)
        if price is None or worst is None or meter is None:
            return None
        reservation = meter.ledger.reserve(worst, cloud=step.backend.zone == "open")
        key = _key_of(request)
        if key is None or reservation is None or key.limits.monthly_budget_usd is None:
            return Charge(price, worst, reservation)
        if not key.reserve(worst):
            meter.ledger.release(reservation)
            return Charge(price, worst, None, key_refused=True)
        return Charge(price, worst, reservation, key=key)

    def _ask_early(self, request: RouteRequest, trace: Trace) -> Early | None:
        """The admission ``_shared_charge`` will need, asked now (before the plan): for the
        step this model's last two requests went to first; None when there is none to guess (a
        priced model not dispatched yet, or whose route just changed) or nothing to ask."""
        assert self.shared is not None
        meter = self.meter
        backend, model, price, worst = None, "", None, None
        if meter is not None:
            guess = self._first.get(request.model)
            if guess is None or not guess[2]:
                return None
            backend, model, _ = guess
            price, worst = self._worst(backend, model, request)
        elif trace.pending is None:
            return None
        cloud = backend is not None and backend.zone == "open"
        asking = self.shared.ask(trace, _key_of(request), worst, cloud)
        return None if asking is None else Early(asking, backend, model, price, worst)

    def _unserved(
        self,
        plan: Plan,
        request: RouteRequest,
        last: UpstreamError | None,
        refused: bool,
        key_refused: bool,
    ) -> NexusError:
        """Why no step answered: the last failure, else the budget's refusal, else none left."""
        if last is not None and plan.exclusions:
            last.context = plan.context(self.registry, [])
        key = request.access
        if last is None and key_refused and key is not None and self.keys is not None:
            return QuotaSpent(
                f"The key '{key.name}' has spent its monthly_budget_usd; it may be used "
                "again next month (UTC), or with a higher budget",
                self.keys.retry_at_month_end(),
            )
        if last is None and refused:
            message = f"The monthly budget cannot hold another request for '{plan.requested}'"
            return NoHealthyBackend(plan.requested, plan.context(self.registry, []), message)
        return last or ServiceUnavailable(f"No backend could serve model '{plan.requested}'")

    def _gate(self, step: Step, request: RouteRequest, trace: Trace, asked: Early | None) -> Gate:
        return Gate(self._shared_charge(step, request, trace, asked))

    async def _gated(
        self,
        attempt: Callable[[Adapter, Step, Call, Charge | Gate | None], Awaitable[T]],
        adapter: Adapter,
        step: Step,
        call: Call,
        trace: Trace,
        gate: Gate,
        before: str | None,
    ) -> T:
        """``attempt``, its upstream request awaiting ``gate`` before it is written (every
        adapter writes through ``http1``); a call the gate refuses is no try of the backend's
        (``before``: whom a failure was counted against until then)."""
        token = BEFORE_SEND.set(gate)
        try:
            return await attempt(adapter, step, call, gate)
        except (BudgetRefused, RateLimited):
            trace.backend, trace.attempts = before, trace.attempts - 1
            step.backend.total_requests -= 1
            raise
        finally:
            BEFORE_SEND.reset(token)

    def _unused(self, early: Early | None, request: RouteRequest) -> None:
        """An early admission no step read: what it holds is given back."""
        if early is not None and self.shared is not None:
            self.shared.drop(early.asking, _key_of(request))

    def _worst(
        self, backend: Backend, model: str, request: RouteRequest
    ) -> tuple[Price | None, float | None]:
        """The price of a call to ``model`` on ``backend`` and its worst case (None: free)."""
        meter = self.meter
        price = meter.price(backend, model) if meter is not None else None
        if price is None or meter is None:
            return None, None
        needs = request.requirements
        worst = meter.bound(
            price, backend, model, needs.prompt_bound, needs.max_tokens, needs.embeddings
        )
        return price, worst

    async def _shared_charge(
        self, step: Step, request: RouteRequest, trace: Trace, early: Early | None = None
    ) -> Charge | None:
        """The request's admission in the shared store: its key's rate limits (at its first
        step) and the step's reservation, in one round trip (``nexus.admission``): the one
        asked before the plan when it was for this step, or for one priced alike."""
        shared = self.shared
        assert shared is not None
        backend, key = step.backend, _key_of(request)
        cloud = backend.zone == "open"
        if early is not None and early.backend is backend and early.model == step.model:
            price, worst = early.price, early.worst
        else:
            price, worst = self._worst(backend, step.model, request)
            if self.meter is not None:
                first = self._first
                if len(first) >= FIRST_STEPS_MAX:
                    first.clear()
                last = first.get(request.model)
                steady = last is not None and last[0] is backend and last[1] == step.model
                first[request.model] = (backend, step.model, steady)
        if early is None:
            held = await shared.admit(trace, key, worst, cloud)
        else:
            held = await shared.answer(early.asking, trace)
            guessed = early.backend
            if worst != early.worst or (guessed is not None and (guessed.zone == "open") != cloud):
                shared.give_back(held, key)  # asked for another price: asked again, for this
                held = await shared.admit(trace, key, worst, cloud)
        if price is None or held is None or worst is None:
            return None
        if held.reservation is None:
            return Charge(price, worst, None, key_refused=held.key_refused)
        return Charge(price, worst, held.reservation, key=key if held.key_held else None)

    def _release_charge(self, charge: Charge | None) -> None:
        if charge is not None and not charge.settled:
            charge.settled = True
            assert self.meter is not None
            self.meter.ledger.release(charge.reservation)
            if charge.key is not None and self.keys is not None:
                self.keys.release(charge.key, charge.worst, charge.reservation)

    def _settle(
        self,
        charge: Charge | None,
        step: Step,
        request: RouteRequest,
        trace: Trace,
        usage: object,
        output_tokens: int | None = None,
    ) -> None:
        """Settle ``charge`` from the backend's ``usage``; without one, from the prompt bound
        and ``output_tokens`` (the worst case when even that is unknown)."""
        if charge is None or charge.settled:
            return
        charge.settled = True
        meter = self.meter
        assert meter is not None
        counted = meter.cost(charge.price, usage)
        if counted is not None:
            cost, tokens = counted
            prompt, completion = tokens.prompt, tokens.completion
        else:
            needs = request.requirements
            prompt = needs.prompt_bound
            if output_tokens is None:
                output_tokens = output_bound(step.backend, step.model, needs.max_tokens, prompt)
            completion = 0 if needs.embeddings else output_tokens
            cost = charge.price.worst_case(prompt, completion)
        meter.ledger.settle(
            charge.reservation, cost, step.backend.name, step.model, prompt, completion
        )
        key = _key_of(request)
        if key is not None and self.keys is not None:
            held = charge.worst if charge.key is not None else 0.0
            self.keys.charge(key, held, cost, charge.reservation)
        trace.cost_usd = cost if trace.cost_usd is None else trace.cost_usd + cost

    def _tell_budget(self, exc: NexusError) -> None:
        """An error answer carries the budget's status too, once it is not normal: a refusal
        by the budget is where a client most needs it."""
        if self.meter is not None:
            budget = self.meter.ledger.headers()
            if budget:  # beside what the error carries already (a key's rate-limit headers)
                told = {name.decode(): value.decode() for name, value in budget}
                exc.extra_headers = {**(exc.extra_headers or {}), **told}

    def _budget_headers(self) -> tuple[tuple[bytes, bytes], ...]:
        meter = self.meter
        if meter is None or meter.ledger.limit is None:
            return ()
        return tuple(meter.ledger.headers())

    def _release(self, backend: Backend) -> None:
        backend.in_flight -= 1
        if self.queue is not None and self.queue.depth:
            self.queue.wake((backend.name,))

    def capacity_returned(self, backend: Backend) -> None:
        """``backend`` became usable or changed what it serves (health recovery, discovery, the
        admin API): nobody in the queue could have waited for it by name, so all plan again."""
        if self.queue is not None and self.queue.depth:
            self.queue.wake(None)

    def _succeeded(
        self, step: Step, request: RouteRequest, latency_ms: float, ttft_ms: float | None
    ) -> None:
        backend = step.backend
        backend.observe(latency_ms, ttft_ms)
        self.router.quality.record(backend.name, step.model, True, ttft_ms, self.clock())
        self.router.remember(request, backend.name)

    def _failed(
        self, step: Step, exc: UpstreamError, request_id: str, *, started: bool = False
    ) -> None:
        backend = step.backend
        # Down for sure only when no connection could be made (refused, unreachable). A timeout
        # is a slow generation, not an outage: like a dropped connection, it counts against the
        # backend's quality below and moves on to the next one.
        if isinstance(exc, UpstreamConnectError) and not started:
            self.health.mark_down(backend, exc.message)
        if not exc.retryable and not started:  # the client's own mistake, reported by the backend
            log.info("request %s: backend %s refused it: %s", request_id, backend.name, exc)
            return
        self.router.quality.record(backend.name, step.model, False, None, self.clock())
        when = "mid-stream" if started else "trying the next backend"
        log.warning("request %s: backend %s failed (%s): %s", request_id, backend.name, when, exc)


BUSY = "Every backend that can serve this model is at capacity"
QUEUE_TIMEOUT = ", and none came free while the request waited in the queue"


def budget_refusal(step: Step, charge: Charge, key: Access | None = None) -> Exclusion:
    if charge.key_refused and key is not None:
        why = f"the key '{key.name}' has not enough of its monthly_budget_usd left for this "
        why += f"call's worst-case cost (${charge.worst:.6f})"
        action = "set a lower max_tokens, raise the key's monthly_budget_usd, or wait"
    else:
        why = f"the monthly budget cannot hold this call's worst-case cost (${charge.worst:.6f})"
        action = "set a lower max_tokens, raise [routing.budget] monthly_limit_usd, or wait"
    return Exclusion(step.backend.name, step.model, "budget", why, action)


def waits_for(plan: Plan) -> list[str]:
    """The backends a request waits for: free ones it would take, busy ones it could use."""
    names = [step.backend.name for step in plan.steps]
    names += [e.backend for e in plan.exclusions if e.stage == "capacity"]
    return names


def upstream_headers(
    step: Step, client: Mapping[str, str], request_id: str, keyed: bool = False
) -> dict[str, str]:
    """Content type, the request id, and auth: a configured key always wins over the client's,
    and the client's own goes only to a backend the user added (never to one found on the
    network by mDNS or a port probe), and never when it is the client's Nexus key (``keyed``)."""
    headers = {"Content-Type": "application/json", "X-Request-Id": request_id}
    backend = step.backend
    if backend.api_key:
        headers["Authorization"] = f"Bearer {backend.api_key}"
    elif "authorization" in client and backend.user_configured and not keyed:
        headers["Authorization"] = client["authorization"]
    return headers


def _usage_of(event: bytes) -> object:
    """The ``usage`` object of an SSE chunk that carries one (else None)."""
    try:
        chunk = orjson.loads(event[event.index(b"{") :])
    except (ValueError, orjson.JSONDecodeError):
        return None
    return chunk.get("usage") if isinstance(chunk, dict) else None


def native_error_event(exc: NexusError, request_id: str) -> bytes:
    """A mid-stream failure in Anthropic's own stream: its ``error`` event."""
    _, body = anthropic_inbound.error_body(exc.status_code, exc.message, request_id=request_id)
    return b"event: error\ndata: " + body + b"\n\n"


def stream_failure(exc: NexusError) -> bytes:
    """The last bytes of a stream that fails: its error event, then ``[DONE]``."""
    return error_event(exc) + DONE


def error_event(exc: NexusError) -> bytes:
    """A mid-stream failure as one SSE event carrying an OpenAI error envelope."""
    return b"data: " + orjson.dumps(exc.envelope()) + b"\n\n"


def _key_of(request: RouteRequest) -> ClientKey | None:
    access = request.access
    return access if isinstance(access, ClientKey) else None
