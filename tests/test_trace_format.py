"""The binary trace and the prefetch list (spec §7): round trips and every bad input."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from obdfuse.crc import crc_raw
from obdfuse.errors import FormatError
from obdfuse.trace.format import (
    HEADER_SIZE,
    MAGIC,
    MAX_PREFETCH_LIST,
    MAX_RECORDS,
    OP_READ,
    RECORD_SIZE,
    PrefetchPath,
    TraceMode,
    TraceRecord,
    classify,
    decode_header,
    decode_trace,
    encode_prefetch_list,
    encode_trace,
    parse_prefetch_list,
)

RECORDS = [TraceRecord(0, 4096, 65536), TraceRecord(2, 1 << 40, 512), TraceRecord(1, 0, 1 << 20)]


def test_layout_is_overlaybds():
    data = encode_trace(RECORDS)
    assert len(data) == HEADER_SIZE + 3 * RECORD_SIZE
    magic, data_size, checksum = struct.unpack_from("<I4xQI4x", data)
    assert (magic, data_size) == (0xC2EF1820, 72)
    assert checksum == crc_raw(data[24:])
    op, layer, count, offset = struct.unpack_from("<B3xIQQ", data, 24 + RECORD_SIZE)
    assert (op, layer, count, offset) == (ord("R"), 2, 512, 1 << 40)


def test_magic_is_crc32_of_the_format_name():
    import zlib

    assert zlib.crc32(b"Container Image Trace Format") == MAGIC


@given(st.lists(st.builds(TraceRecord, st.integers(0, 254), st.integers(0, 1 << 50),
                          st.integers(0, 1 << 20)), max_size=50))
def test_round_trip(records):
    assert decode_trace(encode_trace(records)) == records


def test_empty_trace_round_trips():
    assert decode_trace(encode_trace([])) == []


def test_nonzero_padding_is_accepted_and_checksummed():
    # upstream leaves padding uninitialised; the checksum covers it
    body = bytearray(encode_trace(RECORDS)[HEADER_SIZE:])
    body[1:4] = b"\xaa\xbb\xcc"
    head = bytearray(struct.pack("<I4xQI4x", MAGIC, len(body), crc_raw(body)))
    head[4:8] = b"junk"
    head[20:24] = b"junk"
    assert decode_trace(bytes(head + body)) == RECORDS


def corrupt(data: bytes, at: int, value: bytes) -> bytes:
    return data[:at] + value + data[at + len(value):]


@pytest.mark.parametrize("mangle, message", [
    (lambda d: corrupt(d, 0, b"\0\0\0\0"), "bad magic"),
    (lambda d: d[:-1], "truncated or trailing"),
    (lambda d: d + b"\0" * 24, "truncated or trailing"),
    (lambda d: d[:10], "too short"),
    (lambda d: corrupt(d, 8, struct.pack("<Q", 25)), "not a multiple"),
    (lambda d: corrupt(d, 30, b"\x01"), "checksum"),
    (lambda d: corrupt(d, 16, b"\0\0\0\0"), "checksum"),
])
def test_bad_traces_are_rejected(mangle, message):
    with pytest.raises(FormatError, match=message):
        decode_trace(mangle(encode_trace(RECORDS)), where="t.trace")


def test_absurd_size_rejected_from_the_header_alone():
    head = struct.pack("<I4xQI4x", MAGIC, (MAX_RECORDS + 1) * RECORD_SIZE, 0)
    with pytest.raises(FormatError, match="exceeds the limit"):
        decode_header(head, 1 << 40)


def with_record(op=OP_READ, layer=0, count=4096, offset=0) -> bytes:
    body = struct.pack("<B3xIQQ", op, layer, count, offset)
    return struct.pack("<I4xQI4x", MAGIC, len(body), crc_raw(body)) + body


@pytest.mark.parametrize("record, message", [
    (with_record(op=ord("X")), "unknown op"),
    (with_record(layer=255), "layer index 255 out of range"),
    (with_record(count=1 << 40), "count"),
    (with_record(offset=1 << 63), "offset"),
])
def test_bad_records_are_rejected(record, message):
    with pytest.raises(FormatError, match=message):
        decode_trace(record)


def test_layer_index_checked_against_the_image():
    data = encode_trace([TraceRecord(3, 0, 512)])
    with pytest.raises(FormatError, match="record #0 at offset 24: layer index 3"):
        decode_trace(data, layers=2)
    assert decode_trace(data, layers=4)


def test_prefetch_list_parsing():
    text = b"  /usr/bin/python3  \n\n/usr/lib/python3.11/\n/etc/*\n/\n"
    assert parse_prefetch_list(text) == [
        PrefetchPath("/usr/bin/python3"), PrefetchPath("/usr/lib/python3.11", True),
        PrefetchPath("/etc", True), PrefetchPath("/", True)]
    again = parse_prefetch_list(encode_prefetch_list(parse_prefetch_list(text)))
    assert again == parse_prefetch_list(text)


@pytest.mark.parametrize("text, message", [
    (b"usr/bin\n", "not an absolute path"),
    (b"/a\0b\n", "NUL"),
    (b"\xff\xfe/x\n", "not UTF-8"),
    (b"/x\n" * (MAX_PREFETCH_LIST // 3 + 1), "exceeds the limit"),
])
def test_bad_prefetch_lists(text, message):
    with pytest.raises(FormatError, match=message):
        parse_prefetch_list(text)


def test_mode_detection():
    assert classify(None, b"") is TraceMode.DISABLED
    assert classify(0, b"") is TraceMode.RECORD
    assert classify(96, encode_trace(RECORDS)[:4]) is TraceMode.REPLAY
    assert classify(10, b"/usr/bin\n") is TraceMode.PREFETCH_LIST
