"""Key secrets (nexus/keys/tokens.py): ``nx-`` and 256 random bits, never the same twice, stored
as ``sha256:<64 hex>`` (the form ``[[auth.keys]]`` accepts), listed by an 8-character prefix."""

from __future__ import annotations

import base64
import hashlib
import re

from nexus.config import KEY_HASH
from nexus.keys.tokens import MAX_KEY_LENGTH, PREFIX, SHOWN, hash_of, new_secret, prefix_of, same

URL_SAFE = re.compile(r"[A-Za-z0-9_-]+")


def test_a_secret_is_nx_and_256_random_bits() -> None:
    secret = new_secret()

    assert secret.startswith("nx-") and PREFIX == "nx-"
    body = secret[len(PREFIX) :]
    assert len(body) == 43 and URL_SAFE.fullmatch(body)
    assert len(base64.urlsafe_b64decode(body + "=")) == 32  # 256 bits
    assert len(secret) <= MAX_KEY_LENGTH


def test_secrets_are_unique() -> None:
    made = [new_secret() for _ in range(2000)]

    assert len(set(made)) == len(made)
    assert len({prefix_of(s) for s in made}) > 1900  # the shown part varies too (30 random bits)


def test_hash_is_sha256_hex_of_the_secret_in_the_config_form() -> None:
    secret = new_secret()

    digest = hash_of(secret)

    assert digest == "sha256:" + hashlib.sha256(secret.encode()).hexdigest()
    assert re.fullmatch(r"sha256:[0-9a-f]{64}", digest)
    assert KEY_HASH.fullmatch(digest)  # what [[auth.keys]] hash = "..." accepts
    assert hash_of(secret) == digest  # the same secret, the same hash
    assert hash_of(new_secret()) != digest
    assert secret not in digest and secret[len(PREFIX) :] not in digest


def test_hash_takes_any_header_text() -> None:
    """A header decoded as latin-1 (or with escaped bytes) hashes without an error; it is just
    another wrong key."""
    for odd in ("nx-é", "nx-\udcff", ""):
        assert KEY_HASH.fullmatch(hash_of(odd))


def test_prefix_shows_eight_characters_and_no_more() -> None:
    secret = new_secret()

    shown = prefix_of(secret)

    assert SHOWN == 8
    assert shown == secret[:8] and len(shown) == 8
    assert shown.startswith("nx-")
    assert secret[8:] not in shown


def test_same_compares_whole_strings() -> None:
    digest = hash_of(new_secret())

    assert same(digest, digest)
    assert same(digest, str(digest))
    assert not same(digest, digest[:-1] + ("0" if digest[-1] != "0" else "1"))
    assert not same(digest, digest[:-1])
    assert not same(digest, "")
