"""Keeping secrets out of what Nexus shows: passwords in URLs and keys echoed back by backends.

A backend's URL may carry a password (``http://user:pass@host``) and its configured API key may
come back in an upstream error message ("invalid key sk-..."). Both are replaced by ``***``
wherever a URL or an upstream error text is shown: the API, the dashboard, logs and envelopes.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from urllib.parse import urlsplit, urlunsplit

MASK = "***"
# A value this short is no real secret, and replacing it would garble ordinary text.
MIN_SECRET_CHARS = 6
_USERINFO = re.compile(r"(?<=://)([^/@:\s]*):[^/\s]*@")


def redact_url(url: str) -> str:
    """``url`` with its password, if any, replaced by ``***`` (the user name stays)."""
    if "@" not in url:
        return url
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.netloc.rpartition("@")[2]
    netloc = f"{parts.username or ''}:{MASK}@{host}"
    return urlunsplit(parts._replace(netloc=netloc))


def url_password(url: str) -> str | None:
    try:
        return urlsplit(url).password
    except ValueError:
        return None


def scrub(text: str, secrets: Iterable[str | None]) -> str:
    """``text`` without ``secrets`` and without any password written inside a URL."""
    for secret in secrets:
        if secret and len(secret) >= MIN_SECRET_CHARS and secret in text:
            text = text.replace(secret, MASK)
    if "@" in text:
        text = _USERINFO.sub(lambda m: f"{m.group(1)}:{MASK}@", text)
    return text


def scrub_bytes(data: bytes, secrets: Iterable[str | None]) -> bytes:
    """``scrub`` for a body of any encoding; the bytes come back unchanged when nothing matched."""
    text = data.decode("utf-8", "surrogateescape")
    cleaned = scrub(text, secrets)
    return data if cleaned == text else cleaned.encode("utf-8", "surrogateescape")
