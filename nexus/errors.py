"""Every error Nexus can answer with, and the one place they become an OpenAI envelope.

    NexusError                         status  type                    code
      InvalidRequest                   400     invalid_request_error   invalid_request_error
      Unauthorized                     401     authentication_error    invalid_api_key
      Forbidden                        403     permission_error        forbidden
        CrossOrigin                    403     permission_error        invalid_origin
        CapabilityMismatch             400     invalid_request_error   capability_mismatch +context
      NotFound                         404     invalid_request_error   not_found
        ModelNotFound                  404     invalid_request_error   model_not_found
      MethodNotAllowed                 405     invalid_request_error   method_not_allowed
      Conflict                         409     invalid_request_error   conflict
      RequestTimeout                   408     invalid_request_error   request_timeout
      PayloadTooLarge                  413     invalid_request_error   payload_too_large
      UnsupportedMediaType             415     invalid_request_error   unsupported_media_type
      MisdirectedRequest               421     invalid_request_error   invalid_host
      HeadTooLarge                     431     invalid_request_error   header_too_large
      RateLimited                      429     rate_limit_error        rate_limit_exceeded +retry
        QuotaSpent                     429     insufficient_quota      insufficient_quota +retry
      ServiceUnavailable               503     service_unavailable     service_unavailable
        TooManyConnections             503     service_unavailable     too_many_connections +retry
        NoHealthyBackend               503     service_unavailable     service_unavailable +context
          Saturated                    503     service_unavailable     service_unavailable +retry
        ConnectionLimitReached         503     service_unavailable     service_unavailable +retry
      UpstreamError                    (the backend's failure, mapped once in backends/base.py)
        UpstreamUnavailable            502     server_error            bad_gateway
          UpstreamConnectError         502     server_error            bad_gateway  (cannot connect)
        UpstreamProtocolError          502     server_error            bad_gateway
        UpstreamTimeout                504     server_error            gateway_timeout
        UpstreamStatusError            upstream status; body kept when it is an OpenAI envelope
      InternalError                    500     server_error            internal_error

A client's mistake is never a 500 and every body is JSON.
"""

from __future__ import annotations

import json
import math
from typing import Any, ClassVar

import orjson

JSONDict = dict[str, Any]


class NexusError(Exception):
    status: ClassVar[int] = 500
    type: ClassVar[str] = "server_error"
    code: ClassVar[str | None] = "internal_error"

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param

    @property
    def status_code(self) -> int:
        return self.status

    # Headers the error gained on its way out (the budget's status, say), beside its own.
    extra_headers: dict[str, str] | None = None

    def headers(self) -> dict[str, str]:
        return {}

    def all_headers(self) -> dict[str, str]:
        own = self.headers()
        return {**own, **self.extra_headers} if self.extra_headers else own

    def envelope(self) -> JSONDict:
        return error_envelope(self.message, self.type, self.code, self.param)

    def body(self) -> bytes:
        return orjson.dumps(self.envelope())

    @property
    def error_type(self) -> str:
        """The error's name in metrics, history and logs: one of Nexus's own codes, never text
        a backend chose (that would make label values unbounded)."""
        return self.code or type(self).__name__


def error_envelope(
    message: str, type_: str, code: str | None, param: str | None = None
) -> JSONDict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


NO_BACKENDS_HINT = (
    "Nexus has no backends yet. Add a [[backends]] entry to nexus.toml (`nexus config init` "
    "writes an example), start Ollama (port 11434), LM Studio (1234) or llama.cpp's llama-server "
    "(8080) on this machine, or announce a server over mDNS (_ollama._tcp or _llm._tcp)."
)


class InvalidRequest(NexusError):
    status = 400
    type = "invalid_request_error"
    code = "invalid_request_error"


class Unauthorized(NexusError):
    status = 401
    type = "authentication_error"
    code = "invalid_api_key"

    def headers(self) -> dict[str, str]:
        # The same key will not work a second later: SDKs that honour this header (OpenAI's,
        # Anthropic's, Claude Code, which retries a 401 otherwise) stop at once.
        return {"x-should-retry": "false"}


class Forbidden(NexusError):
    status = 403
    type = "permission_error"
    code = "forbidden"


class CrossOrigin(Forbidden):
    """A page of another site tried to change something (its ``Origin`` is not this server)."""

    code = "invalid_origin"


class NotFound(NexusError):
    status = 404
    type = "invalid_request_error"
    code = "not_found"


class ModelNotFound(NotFound):
    code = "model_not_found"

    def __init__(self, model: str, available: list[str]) -> None:
        shown = (
            ", ".join(available[:50]) if available else "none (no healthy backend lists a model)"
        )
        more = f" (+{len(available) - 50} more)" if len(available) > 50 else ""
        super().__init__(
            f"Model '{model}' not found. Available models: {shown}{more}", param="model"
        )
        self.available = available


class MethodNotAllowed(NexusError):
    status = 405
    type = "invalid_request_error"
    code = "method_not_allowed"

    def __init__(self, message: str, allow: str = "") -> None:
        super().__init__(message)
        self.allow = allow

    def headers(self) -> dict[str, str]:
        return {"Allow": self.allow} if self.allow else {}


class Conflict(NexusError):
    status = 409
    type = "invalid_request_error"
    code = "conflict"


class RateLimited(NexusError):
    """A client key's limit (requests or tokens per minute, calls in flight) is reached."""

    status = 429
    type = "rate_limit_error"
    code = "rate_limit_exceeded"

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = max(1, math.ceil(retry_after))

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after)}


class QuotaSpent(RateLimited):
    """A client key's monthly budget cannot hold the request (until the month ends)."""

    type = "insufficient_quota"
    code = "insufficient_quota"

    def headers(self) -> dict[str, str]:
        return {**super().headers(), "x-should-retry": "false"}  # not before the month ends


class RequestTimeout(NexusError):
    """The request's head or body did not arrive within the server's deadline."""

    status = 408
    type = "invalid_request_error"
    code = "request_timeout"


class PayloadTooLarge(NexusError):
    status = 413
    type = "invalid_request_error"
    code = "payload_too_large"


class UnsupportedMediaType(NexusError):
    status = 415
    type = "invalid_request_error"
    code = "unsupported_media_type"


class MisdirectedRequest(NexusError):
    """The ``Host`` is not a name of this server: a DNS-rebinding page, or a name to allow."""

    status = 421
    type = "invalid_request_error"
    code = "invalid_host"


class HeadTooLarge(NexusError):
    status = 431
    type = "invalid_request_error"
    code = "header_too_large"


class ServiceUnavailable(NexusError):
    status = 503
    type = "service_unavailable"
    code = "service_unavailable"


class TooManyConnections(ServiceUnavailable):
    """Nexus holds ``[server] max_connections`` client connections already."""

    code = "too_many_connections"

    def headers(self) -> dict[str, str]:
        return {"Retry-After": "1"}


class NoHealthyBackend(ServiceUnavailable):
    """Nothing can serve the model; ``context`` names the backends and why each was excluded,
    and the ``X-Nexus-Rejection-*`` headers say the same for clients that read headers only."""

    def __init__(self, model: str, context: JSONDict, message: str | None = None) -> None:
        super().__init__(
            message or f"No healthy backend available for model '{model}'", param="model"
        )
        self.context = context

    def envelope(self) -> JSONDict:
        body = super().envelope()
        body["context"] = self.context
        return body

    def headers(self) -> dict[str, str]:
        headers = rejection_headers(self.context)
        eta = self.context.get("eta_seconds")
        if eta is not None:
            headers["Retry-After"] = str(max(1, math.ceil(eta)))
        return headers


class CapabilityMismatch(NoHealthyBackend):
    """Every backend of the model was left out for what the request needs (vision, tools, JSON
    mode, a context long enough), healthy or not: the request, not the backends, must change, so
    it is the client's error (400), with the same ``context`` as a 503."""

    status = 400
    type = "invalid_request_error"
    code = "capability_mismatch"

    def __init__(self, model: str, context: JSONDict) -> None:
        super().__init__(
            model,
            context,
            f"No backend serving model '{model}' can take this request: it needs what none of "
            "them has (see context)",
        )


class Saturated(NoHealthyBackend):
    """Capable backends exist but are all busy, and the queue is full, off or waited out."""

    def __init__(self, model: str, context: JSONDict, message: str, retry_after: int) -> None:
        super().__init__(model, context, message)
        self.retry_after = retry_after

    def headers(self) -> dict[str, str]:
        return {**super().headers(), "Retry-After": str(self.retry_after)}


class ConnectionLimitReached(ServiceUnavailable):
    """Nexus's own cap on open upstream connections stayed full for the whole wait: not the
    backend's fault, so it is neither retried elsewhere nor held against the backend."""

    def headers(self) -> dict[str, str]:
        return {"Retry-After": "1"}


def rejection_headers(context: JSONDict) -> dict[str, str]:
    """``X-Nexus-Rejection-*``: the backends a plan left out, and why, for header readers."""
    excluded = context.get("excluded") or []
    stages: dict[str, int] = {}
    for item in excluded:
        stages[item["stage"]] = stages.get(item["stage"], 0) + 1
    counts = ", ".join(f"{stage} ({n})" for stage, n in stages.items())
    return {
        "X-Nexus-Rejection-Reasons": f"{len(excluded)} backend(s) excluded: {counts}"
        if excluded
        else "no backend serves this model",
        "X-Nexus-Rejection-Details": _header_json(excluded),
    }


def _header_json(items: list[Any], limit: int = 4000) -> str:
    """ASCII JSON for a header value, trimmed to whole items under ``limit`` characters."""
    text = json.dumps(items, ensure_ascii=True, separators=(",", ":"))
    while len(text) > limit and items:
        items = items[:-1]
        text = json.dumps(items, ensure_ascii=True, separators=(",", ":"))
    return text


class UpstreamError(NexusError):
    """A backend failed. ``retryable`` says whether the next candidate may be tried."""

    retryable: ClassVar[bool] = True
    # Set when this failure ends a walk whose plan left other backends out (privacy, tier...):
    # the client learns why nobody else was tried, as from a 503's context.
    context: JSONDict | None = None

    def __init__(self, backend: str, message: str) -> None:
        super().__init__(message)
        self.backend = backend

    def body(self) -> bytes:
        if self.context is None:
            return super().body()
        return orjson.dumps({**self.envelope(), "context": self.context})

    def headers(self) -> dict[str, str]:
        return {} if self.context is None else rejection_headers(self.context)


class UpstreamUnavailable(UpstreamError):
    status = 502
    type = "server_error"
    code = "bad_gateway"


class UpstreamConnectError(UpstreamUnavailable):
    """No connection could be made at all: the backend is down, not merely misbehaving."""


class UpstreamProtocolError(UpstreamError):
    status = 502
    type = "server_error"
    code = "bad_gateway"


class UpstreamTimeout(UpstreamError):
    status = 504
    type = "server_error"
    code = "gateway_timeout"


class UpstreamStatusError(UpstreamError):
    """The backend answered with an error status.

    5xx and 429 may be retried on another backend; any other 4xx is the client's problem and goes
    back as it is. A 5xx that ends the walk is answered as 502 (the gateway's view), a 4xx keeps its
    status. The backend's own OpenAI error envelope is kept when it sent one.
    """

    def __init__(
        self, backend: str, upstream_status: int, body: bytes, retry_after: str | None = None
    ) -> None:
        self.upstream_status = upstream_status
        self.raw = body
        self.retry_after = retry_after
        self.upstream_envelope = _parse_envelope(body)
        detail = _error_message(self.upstream_envelope, body)
        super().__init__(backend, f"Backend '{backend}' returned {upstream_status}: {detail}")

    @property
    def retryable(self) -> bool:  # type: ignore[override]
        return self.upstream_status >= 500 or self.upstream_status == 429

    @property
    def status_code(self) -> int:
        return 502 if self.upstream_status >= 500 else self.upstream_status

    def headers(self) -> dict[str, str]:
        headers = super().headers()
        if self.retry_after:
            headers["Retry-After"] = self.retry_after
        return headers

    @property
    def error_type(self) -> str:
        if self.upstream_status >= 500:
            return "bad_gateway"
        return "rate_limit_exceeded" if self.upstream_status == 429 else "upstream_error"

    def envelope(self) -> JSONDict:
        if self.upstream_envelope is not None and self.upstream_status < 500:
            return self.upstream_envelope
        if self.upstream_status >= 500:
            return error_envelope(self.message, "server_error", "bad_gateway")
        type_ = "rate_limit_error" if self.upstream_status == 429 else "invalid_request_error"
        code = "rate_limit_exceeded" if self.upstream_status == 429 else "upstream_error"
        return error_envelope(self.message, type_, code)


class InternalError(NexusError):
    pass


def _parse_envelope(body: bytes) -> JSONDict | None:
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    if isinstance(data, dict) and isinstance(data.get("error"), dict):
        return data
    if isinstance(data, dict) and isinstance(data.get("error"), str):
        # Ollama and llama.cpp style: {"error": "text"}; normalise to the OpenAI shape.
        return error_envelope(data["error"], "invalid_request_error", None)
    return None


def _error_message(envelope: JSONDict | None, body: bytes) -> str:
    if envelope is not None:
        message = envelope["error"].get("message")
        if isinstance(message, str):
            return message
    text = body[:500].decode("utf-8", "replace").strip()
    return text or "(empty body)"
