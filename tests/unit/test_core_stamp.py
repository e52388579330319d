"""Change messages carry the write's server time (flags bit 1, docs/protocol.md §4.3): encoded
and decoded, signed or not, refused when truncated, optional for a reader."""

from __future__ import annotations

import pytest

from syncmap.core.wire import (
    MAC_SIZE,
    SIGNED,
    STAMPED,
    ChangeMessage,
    decode_message,
    encode_message,
    verify,
)
from syncmap.errors import CorruptData

KEY = bytes(range(16))
STAMP = 1_795_487_719_528
MSG = ChangeMessage(1, 6, 1, 2459722019465728, "web1:4242", (b"salice", b"sdave"),
                    stamp_ms=STAMP)  # fmt: skip


def test_a_stamp_round_trips_signed_and_unsigned() -> None:
    plain = encode_message(MSG)
    assert plain[4] == STAMPED
    assert plain[-8:] == STAMP.to_bytes(8, "big")
    assert decode_message(plain) == MSG
    signed = encode_message(MSG, KEY)
    assert signed[4] == STAMPED | SIGNED and verify(signed, [KEY])
    assert signed[:-MAC_SIZE] == plain[:4] + bytes([STAMPED | SIGNED]) + plain[5:]
    assert decode_message(signed) == MSG


def test_a_message_without_a_stamp_still_decodes() -> None:
    unstamped = ChangeMessage(1, 6, 1, 7, "web1:4242", (b"salice",))
    data = encode_message(unstamped)
    assert data[4] == 0
    assert decode_message(data).stamp_ms == 0
    assert decode_message(data) == unstamped


def test_the_stamp_is_covered_by_the_mac() -> None:
    signed = bytearray(encode_message(MSG, KEY))
    signed[-MAC_SIZE - 1] ^= 1  # the stamp's last byte
    assert not verify(bytes(signed), [KEY])


@pytest.mark.parametrize("cut", [1, 8, 9])
def test_a_truncated_stamp_is_corrupt(cut: int) -> None:
    with pytest.raises(CorruptData):
        decode_message(encode_message(MSG)[:-cut])


def test_an_unknown_flag_is_still_corrupt() -> None:
    data = bytearray(encode_message(MSG))
    data[4] |= 0x04
    with pytest.raises(CorruptData):
        decode_message(bytes(data))


def test_a_stamp_flag_on_a_message_too_short_for_it_is_corrupt() -> None:
    data = bytearray(encode_message(ChangeMessage(3, 0, 1, 7, "", ())))
    data[4] = STAMPED
    with pytest.raises(CorruptData):
        decode_message(bytes(data))
