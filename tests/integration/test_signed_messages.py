"""Protocol v2 on a real redis-server (issue 12 §3): the Lua HMAC equals Python's ``hmac`` for the
same key and message, the store's digest chain equals the one a reader computes from the
messages, a map with a signing key applies only messages signed with one of its keys (rotation),
and the staleness bound holds against an exact-current-sequence forgery after a lost message,
with and without a key (the digest chain), but not with the digest check off (guard-off)."""

from __future__ import annotations

import hashlib
import hmac
import os
import time

import msgspec
import pytest
import redis

from syncmap import MapConfig, SyncMap
from syncmap.core.nearcache import Event, Guards
from syncmap.core.wire import (
    MAC_SIZE,
    OP_SET,
    STAMPED,
    ChangeMessage,
    decode_message,
    encode_message,
    link,
    next_digest,
    verify,
)
from syncmap.embedded import EmbeddedRedis
from syncmap.errors import ConfigurationError
from syncmap.keys import Layout, bucket_of, encode_key
from syncmap.signing import pads, signing_keys
from syncmap.testing.rawstore import RawStore
from syncmap.testing.wait import wait_until

CHANNEL = "sm:{m}:ch"
KEY = bytes(range(32))
CFG = MapConfig(buckets=4, max_staleness=0.4, presence=False)


def relay_store(raw: redis.Redis, key: bytes | None, buckets: int = 4) -> RawStore:
    """A store whose scripts hand back their messages (relay mode) instead of publishing them."""
    store = RawStore(raw, Layout("sm", "m", buckets), "writer:1", target="",
                     pads=pads(key) if key else b"")  # fmt: skip
    store.load_scripts()
    return store


def run(store: RawStore, name: str, bucket: int, *args: object) -> list[bytes]:
    """Run one write script; the messages it made (relay mode keeps them for the caller)."""
    made: list[bytes] = []
    store.relay = made.extend
    store.call([store.script(name, bucket, *args)], write=True)
    return made


@pytest.mark.parametrize("key", [KEY[:16], KEY, os.urandom(64), os.urandom(100)],
                         ids=["16-bytes", "key", "random-64", "random-100"])  # fmt: skip
def test_lua_hmac_equals_python_hmac(raw: redis.Redis, key: bytes) -> None:
    store = relay_store(raw, key)
    writes = [(b"sa", b"\x01", 0, "set", ""), (b"s" + bytes(300), b"x", 0, "set", "")]
    for n, args in enumerate(writes):
        (data,) = run(store, "set", 1, *args)
        body, tag = data[:-MAC_SIZE], data[-MAC_SIZE:]
        assert tag == hmac.digest(key, body, hashlib.sha1), f"message {n}"
        assert verify(data, [key]) and verify(data, [os.urandom(16), key])
        assert not verify(data, [os.urandom(16)])
        msg = decode_message(data)
        assert (msg.op, msg.seq, msg.fields) == (OP_SET, n + 1, (args[0],))
        assert data == encode_message(msg, key)  # Lua and Python build the same bytes


def test_unsigned_when_the_map_has_no_key(raw: redis.Redis) -> None:
    (data,) = run(relay_store(raw, None), "set", 0, b"sa", b"\x01", 0, "set", "")
    assert data[4] == STAMPED and not verify(data, [KEY])  # stamped (§4.3), not signed
    assert data == encode_message(decode_message(data))


def test_the_store_digest_chain_is_the_readers(raw: redis.Redis) -> None:
    """Every script that publishes (set, delete, mset, clear, probe reaping) extends ``#h`` the
    way wire.link/next_digest do; a new epoch starts again from ''."""
    store = relay_store(raw, KEY)
    d = store.layout.data(2)
    digest, made = "", []
    made += run(store, "set", 2, b"sa", b"\x01", 0, "set", "")
    made += run(store, "mset", 2, 0, b"sb", b"\x02", b"sc", b"\x03")
    made += run(store, "delete", 2, b"sa", "del", "")
    made += run(store, "set", 2, b"sd", b"\x04", 1, "set", "")  # expires in 1 ms
    made += run(store, "clear", 2)
    made += run(store, "set", 2, b"se", b"\x05", 1, "set", "")
    deadline = time.monotonic() + 2
    while time.monotonic() < deadline:  # the TTL of 1 ms passes on Redis's clock
        reaped = run(store, "probe", 2, 500)
        if reaped:
            made += reaped
            break
    assert [decode_message(m).op for m in made] == [1, 1, 2, 1, 3, 1, 4]
    for data in made:
        digest = next_digest(digest, link(decode_message(data)))
    assert raw.hget(d, "#h").decode() == digest
    states, _, _ = store.probe()
    assert states[2][2] == digest and states[2][1] == 8
    assert states[0][2] == ""  # never written
    raw.delete(d)  # the bucket's data hash is lost: a new epoch, a new chain
    (first,) = run(store, "set", 2, b"sa", b"\x01", 0, "set", "")
    assert raw.hget(d, "#h").decode() == next_digest("", link(decode_message(first)))


def test_signing_keys_and_environment() -> None:
    assert signing_keys(None, {}) == ()
    assert signing_keys(None, {"SYNCMAP_SIGNING_KEY": f"{KEY.hex()}, {KEY[::-1].hex()}"}) == (
        KEY, KEY[::-1])  # fmt: skip
    assert signing_keys((), {"SYNCMAP_SIGNING_KEY": KEY.hex()}) == ()
    assert signing_keys([KEY, KEY[:16]]) == (KEY, KEY[:16])
    for bad in (b"short", [KEY, b"short"], "text-key"):
        with pytest.raises(ConfigurationError):
            signing_keys(bad)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError):
        signing_keys(None, {"SYNCMAP_SIGNING_KEY": "not hex"})


def events_of(m: SyncMap) -> list[Event]:
    seen: list[Event] = []
    m.subscribe(seen.append, inline=True)
    return seen


def test_a_keyed_map_applies_only_signed_messages_and_rotates(
    redis_server: EmbeddedRedis, raw: redis.Redis
) -> None:
    new, old = os.urandom(32), os.urandom(32)
    url = redis_server.url
    with SyncMap("m", url, config=CFG, signing_key=old) as writer, \
         SyncMap("m", url, config=CFG, signing_key=[old, new]) as reader:  # fmt: skip
        seen = events_of(reader)
        writer["a"] = 1
        wait_until(lambda: any(e.key == "a" for e in seen), 5, "the signed write's event")
        b = bucket_of(encode_key("a", 100), 4)
        forged = ChangeMessage(OP_SET, b, 10**6, 1, "attacker", (b"sa",))
        for data in (encode_message(forged), encode_message(forged, os.urandom(32)),
                     encode_message(forged, old)[:-1] + b"\0", b"garbage"):  # fmt: skip
            raw.publish(CHANNEL, data)
        # A bound for a loaded machine, not a delay: the wait ends as soon as all four are in.
        wait_until(lambda: reader.statistics().forged_messages >= 4, 20, "4 forged dropped")
        assert reader.statistics().forged_messages == 4
        assert reader.statistics().corrupt_messages == 0
        assert not [e for e in seen if e.origin == "attacker"]
        # Rotation step 2: the writer signs with the new key; the reader verifies both.
        with SyncMap("m", url, config=CFG, signing_key=[new, old]) as writer2:
            writer2["b"] = 2
            wait_until(lambda: any(e.key == "b" for e in seen), 5, "new-key write's event")
            assert reader.get("b") == 2
            # A server that still has only the old key refuses the new key's messages.
            before = writer.statistics().forged_messages
            writer2["c"] = 3
            wait_until(lambda: writer.statistics().forged_messages > before, 5, "refused")


def ghost_write(raw: redis.Redis, key: str, value: int, signing: bytes | None) -> tuple[int, int]:
    """A real write whose relayed message is lost (its writer died before publishing): the
    version is taken, the chain extended, nothing published.  Returns (bucket, version)."""
    store = relay_store(raw, signing)
    store.restamp("msgpack", "4/msgpack")
    field = encode_key(key, 100)
    b = bucket_of(field, 4)
    run(store, "set", b, field, msgspec.msgpack.encode(value), 0, "set", "")
    return b, int(raw.hget(store.layout.data(b), "#s"))


def forgery_after_a_lost_message(
    redis_server: EmbeddedRedis, raw: redis.Redis, key: bytes | None, guards: Guards
) -> tuple[float, SyncMap]:
    """Cache k@1 on the reader, lose k@2's message, then forge the exact current sequence naming
    another key of the bucket.  Returns how long the reader served the stale k (capped at 8 Δ)."""
    cfg = MapConfig(buckets=4, max_staleness=0.4, presence=False, guards=guards)
    reader = SyncMap("m", redis_server.url, config=cfg, signing_key=key or ())
    with SyncMap("m", redis_server.url, config=cfg, signing_key=key or ()) as writer:
        writer["k"] = 1
    wait_until(lambda: reader.get("k") == 1 and reader.get_with_meta("k")[2] == "local", 5,
               "k@1 cached")  # fmt: skip
    b, seq = ghost_write(raw, "k", 2, key)
    epoch = int(raw.hget(f"sm:{{m:{b}}}:d", "#e"))
    other = next(f"o{i}" for i in range(1000) if bucket_of(encode_key(f"o{i}", 100), 4) == b)
    raw.publish(CHANNEL, encode_message(
        ChangeMessage(OP_SET, b, seq, epoch, "attacker", (encode_key(other, 100),))))  # fmt: skip
    written = time.monotonic()
    limit = 8 * cfg.max_staleness
    while time.monotonic() - written < limit:
        if reader.get("k") == 2:
            break
        # Pacing, not a wait for an event: a reader spinning without a pause starves the
        # threads that renew the leases (vouches, probes), its buckets lapse and its reads go
        # to the store, which would hide the stale value this measures.
        time.sleep(0.002)
    return time.monotonic() - written, reader


@pytest.mark.parametrize("key", [None, KEY], ids=["no-key", "key"])
def test_forged_current_sequence_after_a_lost_message_costs_at_most_max_staleness(
    redis_server: EmbeddedRedis, raw: redis.Redis, key: bytes | None
) -> None:
    stale_for, reader = forgery_after_a_lost_message(redis_server, raw, key, Guards())
    with reader:
        s = reader.statistics()
    assert stale_for < CFG.max_staleness + 0.1, f"stale for {stale_for:.2f} s"
    if key is None:
        assert s.digest_mismatches >= 1  # the forged message was applied; the chain caught it
    else:
        assert s.forged_messages >= 1 and s.digest_mismatches == 0


def test_guard_off_control_the_forgery_keeps_a_reader_stale(
    redis_server: EmbeddedRedis, raw: redis.Redis
) -> None:
    """Without the digest comparison (protocol v1's behaviour) the same attack keeps k stale for
    8 x max_staleness and more: the probe sees the sequence it has."""
    stale_for, reader = forgery_after_a_lost_message(
        redis_server, raw, None, Guards(digest_chain=False)
    )
    reader.close()
    assert stale_for >= 8 * CFG.max_staleness
