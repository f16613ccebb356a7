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

from ..admission import SharedAdmission
from ..errors import RateLimited, Unauthorized
from ..keys.ring import ClientKey, KeyRing
from ..keys.tokens import MAX_KEY_LENGTH, hash_of
from ..keys.window import Refusal
from .http import header_pairs

KEY_SCOPE = "nexus.client_key"
MODELS_PATH = "/v1/models"
USAGE_PATH = "/v1/usage"
SEEN_MAX = 4096  # header values remembered as carrying a live key
ASK = "send your Nexus key as 'Authorization: Bearer <key>' or 'x-api-key: <key>'"


class Auth:
    def __init__(
        self,
        ring: KeyRing,
        inference_paths: set[str],
        shared: SharedAdmission | None = None,
    ) -> None:
        self.ring = ring
        # [state] backend = "redis": a limited key's admission is made in the store, at
        # dispatch (with the budget's reservation, in one round trip)
        self.shared = shared
        self.inference = frozenset(inference_paths)  # admitted against the key's limits
        self.paths = self.inference | {MODELS_PATH, USAGE_PATH}  # need a key
        # Header values already found to carry a key: the next request with the same value
        # skips parsing and hashing. Only live keys are kept; revocation and expiry are still
        # checked on every request, and any change to the key set empties the map. A lookup by
        # the value itself leaks nothing: Python's string hash is seeded per process, and only
        # a value equal to a cached one can match.
        self._seen: dict[bytes, ClientKey] = {}
        self._seen_version = ring.version

    def identify(self, scope: Scope) -> ClientKey:
        """The live key the request carries; else a 401 that says what is wrong."""
        ring = self.ring
        if self._seen_version != ring.version:
            self._seen.clear()
            self._seen_version = ring.version
        first = _first_credential(scope["headers"])  # the bearer token is tried first
        key = self._seen.get(first) if first is not None else None
        if key is not None and key.revoked_at is None and ring.clock() < key.expires:
            return key
        secrets = _sent(scope["headers"])
        if not secrets:
            raise Unauthorized(f"Missing API key: {ASK}")
        for secret in secrets:
            key = ring.find(secret)
            if key is not None:
                self._remember(scope["headers"], secret, key)
                return key
        for secret in secrets:  # not live: say why when the key is ours, else just "wrong"
            known = ring.by_hash(hash_of(secret)) if len(secret) <= MAX_KEY_LENGTH else None
            if known is not None and known.revoked_at is not None:
                raise Unauthorized(f"The key '{known.name}' was revoked")
            if known is not None:
                expired = datetime.fromtimestamp(known.expires, UTC).isoformat()
                raise Unauthorized(f"The key '{known.name}' expired at {expired}")
        raise Unauthorized(f"Invalid API key: {ASK}")

    def _remember(self, headers: list[tuple[bytes, bytes]], secret: str, key: ClientKey) -> None:
        """Remember the request's first credential header when it is the one that held ``key``."""
        first = _first_credential(headers)
        if first is None or secret not in first.decode("latin-1"):
            return
        if len(self._seen) >= SEEN_MAX:
            self._seen.clear()
        self._seen[bytes(first)] = key

    def admit(self, key: ClientKey) -> bytes | None:
        """Count the request against the key's limits and answer its rate-limit header lines,
        or refuse it with when to retry; None when the shared store admits it later."""
        ring = self.ring
        if self.shared is not None and self.shared.defers(key):
            return None
        now = ring.clock()
        if now >= ring.next_month:
            ring.roll()  # the key's budget is this month's before anything reserves from it
        window = key.window
        got = window.admit(now)
        if type(got) is bytes:
            return got
        assert isinstance(got, Refusal)
        error = RateLimited(f"Rate limit reached: {got.message}", got.retry_after)
        pairs = header_pairs(window.head(now))
        error.extra_headers = {name.decode(): value.decode() for name, value in pairs}
        raise error

    def head(self, key: ClientKey) -> bytes:
        """The rate-limit header lines of a key whose request was not counted (``/v1/models``)."""
        return key.window.head(self.ring.clock())


def _first_credential(headers: list[tuple[bytes, bytes]]) -> bytes | None:
    """The ``Authorization`` value, else the ``x-api-key`` one (as sent)."""
    api_key = None
    for name, value in headers:
        if name == b"authorization":
            return value
        if name == b"x-api-key" and api_key is None:
            api_key = value
    return api_key


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
