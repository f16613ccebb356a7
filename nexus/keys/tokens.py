"""Key secrets: made here, shown once, kept only as hashes.

A key is ``nx-`` and 43 URL-safe characters (256 random bits). What is stored and compared is its
SHA-256: a lookup by hash cannot leak the secret through timing (an attacker controls the key,
not its digest), and the found hash is compared once more in constant time.
"""

from __future__ import annotations

import hashlib
import secrets

PREFIX = "nx-"
SHOWN = 8  # characters of a key a listing shows: "nx-" and five more
MAX_KEY_LENGTH = 512  # longer is not a key: refused before hashing


def new_secret() -> str:
    return PREFIX + secrets.token_urlsafe(32)


def hash_of(secret: str) -> str:
    return "sha256:" + hashlib.sha256(secret.encode("utf-8", "surrogateescape")).hexdigest()


def prefix_of(secret: str) -> str:
    return secret[:SHOWN]


def same(a: str, b: str) -> bool:
    return secrets.compare_digest(a.encode(), b.encode())
