"""Client keys on the inference routes (``[auth] enabled = true``).

A request to an inference route must carry a live key, as ``Authorization: Bearer <key>`` or
``x-api-key: <key>`` (what the OpenAI and Anthropic clients send). The key is found by its hash,
then its limits admit the request or answer 429 with ``Retry-After``. Every answer to a keyed
request carries OpenAI's ``x-ratelimit-*`` headers for the limits the key has. The key itself
goes nowhere: not upstream, not into logs, history or metrics (only its name does).
"""

from __future__ import annotations

from datetime import UTC, datetime

from starlette.types import Scope

from ..errors import RateLimited, Unauthorized
from ..keys.ring import ClientKey, KeyRing
from ..keys.tokens import MAX_KEY_LENGTH, hash_of

KEY_SCOPE = "nexus.client_key"
MODELS_PATH = "/v1/models"
USAGE_PATH = "/v1/usage"
ASK = "send your Nexus key as 'Authorization: Bearer <key>' or 'x-api-key: <key>'"


class Auth:
    def __init__(self, ring: KeyRing, inference_paths: set[str]) -> None:
        self.ring = ring
        self.inference = frozenset(inference_paths)  # admitted against the key's limits
        self.paths = self.inference | {MODELS_PATH, USAGE_PATH}  # need a key

    def identify(self, scope: Scope) -> ClientKey:
        """The live key the request carries; else a 401 that says what is wrong."""
        secrets = _sent(scope["headers"])
        if not secrets:
            raise Unauthorized(f"Missing API key: {ASK}")
        ring = self.ring
        for secret in secrets:
            key = ring.find(secret)
            if key is not None:
                return key
        for secret in secrets:  # not live: say why when the key is ours, else just "wrong"
            known = ring.by_hash(hash_of(secret)) if len(secret) <= MAX_KEY_LENGTH else None
            if known is not None and known.revoked_at is not None:
                raise Unauthorized(f"The key '{known.name}' was revoked")
            if known is not None:
                expired = datetime.fromtimestamp(known.expires, UTC).isoformat()
                raise Unauthorized(f"The key '{known.name}' expired at {expired}")
        raise Unauthorized(f"Invalid API key: {ASK}")

    def admit(self, key: ClientKey) -> None:
        """Count the request against the key's limits, or refuse it with when to retry."""
        ring = self.ring
        now = ring.clock()
        if now >= ring.next_month:
            ring.roll()  # the key's budget is this month's before anything reserves from it
        refusal = key.window.admit(now)
        if refusal is not None:
            error = RateLimited(f"Rate limit reached: {refusal.message}", refusal.retry_after)
            error.extra_headers = self.headers(key)
            raise error

    def headers(self, key: ClientKey) -> dict[str, str]:
        now = self.ring.clock()
        return {name.decode(): value.decode() for name, value in key.window.headers(now)}


def _sent(headers: list[tuple[bytes, bytes]]) -> list[str]:
    """The keys a request carries: a bearer token and an ``x-api-key`` (either may be absent)."""
    found = []
    for name, value in headers:
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").strip().partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                found.append(token.strip())
        elif name == b"x-api-key" and value.strip():
            found.append(value.decode("latin-1").strip())
    return found


def key_of(scope: Scope) -> ClientKey | None:
    key: ClientKey | None = scope.get(KEY_SCOPE)
    return key
