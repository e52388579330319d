"""Every change message a write script makes carries the write's Redis server time (flags bit 1,
docs/protocol.md §4.3), on every route and for every op, signed or not."""

from __future__ import annotations

import pytest
import redis

from syncmap.core.wire import SIGNED, STAMPED, decode_message, encode_message, verify
from syncmap.keys import Layout
from syncmap.signing import pads
from syncmap.testing.rawstore import RawStore

KEY = bytes(range(16))


def server_ms(raw: redis.Redis) -> int:
    s, us = raw.time()
    return int(s) * 1000 + int(us) // 1000


@pytest.mark.parametrize("key", [None, KEY])
def test_every_script_stamps_its_message_with_the_server_time(
    raw: redis.Redis, key: bytes | None
) -> None:
    store = RawStore(raw, Layout("sm", "m", 1), "writer:1", target="",
                     pads=pads(key) if key else b"")  # fmt: skip
    store.load_scripts()
    made: list[bytes] = []
    store.relay = made.extend
    before = server_ms(raw)
    for name, args in (("set", (b"sa", b"\x01", 0, "set", "")), ("mset", (0, b"sb", b"\x02")),
                       ("delete", (b"sa", "del", "")), ("set", (b"sc", b"\x03", 1, "set", "")),
                       ("clear", ())):  # fmt: skip
        store.call([store.script(name, 0, *args)], write=True)
    store.call([store.script("probe", 0, 500)], write=True)  # nothing left to reap: no message
    after = server_ms(raw)
    assert [decode_message(m).op for m in made] == [1, 1, 2, 1, 3]
    for data in made:
        msg = decode_message(data)
        assert data[4] == STAMPED | (SIGNED if key else 0)
        assert before <= msg.stamp_ms <= after
        assert data == encode_message(msg, key)  # Python re-encodes the script's bytes
        if key:
            assert verify(data, [KEY])
