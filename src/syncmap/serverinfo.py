"""Which server is this: Redis or Valkey, and which version, from ``INFO server``.

Valkey answers ``redis_version:7.2.4`` whatever its own version (it pins the field for clients that
gate features on it) and says what it is in ``server_name:valkey`` and ``valkey_version:8.1.8``.
Everything that prints a server's version (``syncmap doctor``, the demo, the benchmarks, the
embedded server) goes through :func:`server_identity`, so Valkey is named as Valkey.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

__all__ = ["ServerIdentity", "server_identity"]

# server_name values whose product is spelled other than str.capitalize() would spell it.
_SPELLING = {"keydb": "KeyDB"}


class ServerIdentity(NamedTuple):
    product: str  # "Redis", "Valkey"
    version: str  # the product's own version: "7.0.15", "8.1.8" ("?" when INFO has none)
    redis_version: str  # what INFO's redis_version says (Valkey: "7.2.4")

    @property
    def label(self) -> str:
        """``Redis 7.0.15`` or ``Valkey 8.1.8``."""
        return f"{self.product} {self.version}"

    @property
    def detail(self) -> str:
        """The label, plus the Redis version it claims when that is not its own."""
        if self.product == "Redis" or self.redis_version in ("?", self.version):
            return self.label
        return f"{self.label} (redis_version {self.redis_version})"


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def server_identity(info: Mapping[str, Any]) -> ServerIdentity:
    """The product and version from an ``INFO server`` reply (as redis-py parses it)."""
    redis_version = _text(info.get("redis_version", "?"))
    name = _text(info.get("server_name", "")).strip().lower()
    if not name and "valkey_version" in info:
        name = "valkey"
    if name and name != "redis":
        product = _SPELLING.get(name, name.capitalize())
        return ServerIdentity(product, _text(info.get(f"{name}_version", redis_version)),
                              redis_version)  # fmt: skip
    return ServerIdentity("Redis", redis_version, redis_version)
