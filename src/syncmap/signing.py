"""Signing keys of change messages: ``SyncMap(signing_key=...)``, ``ReplicatedMap(...)`` alike.

A map takes one key or a sequence of keys: the first signs, every one of them verifies.  That is
the rotation story (docs/deploying.md, "Signing keys"): add the new key as a second verifier on
every server, then make it first everywhere, then drop the old one; no message is refused at any
step.  Without an argument the keys come from ``$SYNCMAP_SIGNING_KEY`` (hex, comma-separated in
the same order); ``signing_key=()`` means no key whatever the environment says.

In store mode the Lua write scripts sign (docs/protocol.md §4.1).  Lua has ``redis.sha1hex`` and
nothing else, so the client hands a script the HMAC-SHA1 pads of the signing key, ``K xor ipad``
and ``K xor opad`` (64 bytes each, :func:`pads`), and the script only concatenates and hashes.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence

from .errors import ConfigurationError

ENV = "SYNCMAP_SIGNING_KEY"
MIN_BYTES = 16
SigningKey = bytes | Sequence[bytes] | None
"""What ``signing_key=`` takes: a key, keys (the first signs, all verify), or None (the env)."""


def signing_keys(arg: SigningKey, env: dict[str, str] | None = None) -> tuple[bytes, ...]:
    """The keys a map signs with (the first) and verifies with (all); ``()`` for none."""
    if arg is None:
        text = (os.environ if env is None else env).get(ENV, "").strip()
        if not text:
            return ()
        try:
            arg = [bytes.fromhex(part.strip()) for part in text.split(",")]
        except ValueError as exc:
            raise ConfigurationError(
                f"${ENV} must be hex keys separated by commas (e.g. from "
                "'python -c \"import os; print(os.urandom(32).hex())\"')"
            ) from exc
    keys = (arg,) if isinstance(arg, bytes | bytearray) else tuple(arg)
    for key in keys:
        if not isinstance(key, bytes | bytearray) or len(key) < MIN_BYTES:
            raise ConfigurationError(
                f"signing_key must be at least {MIN_BYTES} bytes (use os.urandom(32)), or a "
                "sequence of such keys (the first signs, all verify)"
            )
    return tuple(bytes(k) for k in keys)


def pads(key: bytes) -> bytes:
    """``(K xor ipad) | (K xor opad)``, 128 bytes: what a write script needs to compute
    HMAC-SHA1(K, m) = SHA1(K^opad | SHA1(K^ipad | m)) with ``redis.sha1hex`` alone (RFC 2104: a
    key longer than the 64-byte block is hashed first)."""
    if len(key) > 64:
        key = hashlib.sha1(key).digest()  # noqa: S324 (RFC 2104 with SHA-1)
    key = key.ljust(64, b"\0")
    return bytes(b ^ 0x36 for b in key) + bytes(b ^ 0x5C for b in key)
