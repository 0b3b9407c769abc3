"""Sealed LSMT layers: the real sample, header codec, and one test per hostile input (§3.1–3.4)."""

from __future__ import annotations

import pytest
import trio

from obdfuse.blob import BytesBlob, FileBlob
from obdfuse.errors import FormatError
from obdfuse.layers.header import (
    COMMIT_HEADER_FLAGS,
    COMMIT_TRAILER_FLAGS,
    NULL_UUID,
    LsmtHeader,
)
from obdfuse.layers.sealed import open_layer
from obdfuse.layers.segment import INVALID_ENTRY, encode, make_segments

UUID = "11111111-2222-3333-4444-555555555501"


def sealed_bytes(
    entries,
    *,
    data_sectors=16,
    vsize=1 << 20,
    index_size=None,
    index_offset=None,
    header_flags=COMMIT_HEADER_FLAGS,
    trailer_flags=COMMIT_TRAILER_FLAGS,
    pad=True,
) -> bytes:
    """A committed layer with raw `entries` (offset, length, moffset, zeroed) in its index."""
    hdr = LsmtHeader(flags=header_flags, virtual_size=vsize, uuid=UUID)
    data = bytes(range(256)) * (data_sectors * 2)
    index = encode(make_segments(*zip(*entries, strict=True))) if entries else b""
    n = len(index) // 16
    if pad:
        index += INVALID_ENTRY * (-n % 256)
    ioff = 4096 + len(data) if index_offset is None else index_offset
    trailer = hdr.replace(
        flags=trailer_flags,
        index_offset=ioff,
        index_size=len(index) // 16 if index_size is None else index_size,
    )
    return hdr.pack() + data + index + trailer.pack()


def open_bytes(raw: bytes):
    return trio.run(open_layer, BytesBlob(raw, name="hostile.layer"))


def test_l1_commit_sample(samples):
    layer = trio.run(open_layer, FileBlob(samples / "layers" / "l1.commit"))
    assert layer.virtual_size == 1 << 30
    assert layer.uuid == UUID
    assert layer.parent_uuid == NULL_UUID
    assert layer.header.flags == 7 and layer.trailer.flags == 6
    assert len(layer.segments) == 13
    assert layer.wrapping == []
    trio.run(layer.aclose)


def test_header_round_trip():
    hdr = LsmtHeader(
        flags=7,
        index_offset=4096 * 3,
        index_size=256,
        virtual_size=1 << 30,
        uuid="c02fb491-b4d4-4904-8684-a014d032af78",
        user_tag=b"hello",
    )
    slot = hdr.pack()
    assert len(slot) == 4096 and slot[390:] == bytes(4096 - 390)
    back = LsmtHeader.unpack(slot, "x")
    assert back.uuid == "C02FB491-B4D4-4904-8684-A014D032AF78"  # stored uppercase
    assert slot[56:93] == b"C02FB491-B4D4-4904-8684-A014D032AF78\0"
    assert back.user_tag == b"hello" and back.index_size == 256


def test_well_formed_synthetic_layer_opens():
    layer = open_bytes(sealed_bytes([(0, 8, 8, False), (8, 8, 16, False), (100, 50, 24, True)]))
    assert len(layer.segments) == 3


def test_rejects_overlapping_segments():
    with pytest.raises(FormatError, match=r"hostile\.layer.*overlaps"):
        open_bytes(sealed_bytes([(0, 10, 8, False), (5, 5, 18, False)]))


def test_rejects_unsorted_segments():
    with pytest.raises(FormatError, match="unsorted"):
        open_bytes(sealed_bytes([(20, 4, 8, False), (0, 4, 12, False)]))


def test_rejects_moffset_past_data():
    with pytest.raises(FormatError, match="past the data area"):
        open_bytes(sealed_bytes([(0, 8, 20, False)], data_sectors=16))  # data ends at 24


def test_rejects_moffset_in_header():
    with pytest.raises(FormatError, match="header"):
        open_bytes(sealed_bytes([(0, 4, 2, False)]))


def test_rejects_zero_length():
    with pytest.raises(FormatError, match="length 0"):
        open_bytes(sealed_bytes([(0, 0, 8, False)]))


def test_rejects_segment_past_virtual_size():
    with pytest.raises(FormatError, match="virtual size"):
        open_bytes(sealed_bytes([(2040, 16, 8, False)], vsize=2048 * 512 - 512))


def test_rejects_a_virtual_size_no_lsmt_can_address():
    """A huge virtual size would overflow st_size (int64) and every consumer after it."""
    with pytest.raises(FormatError, match=r"header at 0: virtual size 18446744073709551615 exc"):
        open_bytes(sealed_bytes([(0, 8, 8, False)], vsize=(1 << 64) - 1))


def test_rejects_wrong_magic():
    raw = bytearray(sealed_bytes([(0, 8, 8, False)]))
    raw[0] ^= 0xFF
    with pytest.raises(FormatError, match="bad magic"):
        open_bytes(bytes(raw))


def test_rejects_non_ascii_uuid():
    raw = bytearray(sealed_bytes([(0, 8, 8, False)]))
    trailer = len(raw) - 4096
    raw[trailer + 56] = 0xC3
    with pytest.raises(FormatError, match="uuid is not ASCII"):
        open_bytes(bytes(raw))


def test_rejects_garbage_uuid():
    raw = bytearray(sealed_bytes([(0, 8, 8, False)]))
    raw[56:60] = b"zzzz"
    with pytest.raises(FormatError, match="not a UUID"):
        open_bytes(bytes(raw))


def test_rejects_absurd_index_size():
    with pytest.raises(FormatError, match="exceeds the limit"):
        open_bytes(sealed_bytes([(0, 8, 8, False)], index_size=1 << 40))


def test_rejects_index_overrunning_trailer():
    with pytest.raises(FormatError, match="overruns the trailer"):
        open_bytes(sealed_bytes([(0, 8, 8, False)], index_size=300))


def test_rejects_index_offset_outside_file():
    with pytest.raises(FormatError, match="outside the data area"):
        open_bytes(sealed_bytes([(0, 8, 8, False)], index_offset=1 << 50))


def test_rejects_unsealed_trailer():
    with pytest.raises(FormatError, match="sealed"):
        open_bytes(sealed_bytes([(0, 8, 8, False)], trailer_flags=0x02))


def test_rejects_truncated_file():
    with pytest.raises(FormatError, match="too small"):
        open_bytes(sealed_bytes([])[:5000])


def test_rejects_not_a_layer():
    with pytest.raises(FormatError, match="bad magic"):
        open_bytes(b"hello world" * 1000)


def test_close_sealed_layout_with_unpadded_index():
    layer = open_bytes(sealed_bytes([(0, 8, 8, False)], pad=False))
    assert len(layer.segments) == 1
