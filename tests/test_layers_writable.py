"""Writable layers: append log, torn records, sparse mode, durability rules (spec §3.5, §3.7)."""

from __future__ import annotations

import os

import pytest
import trio

from obdfuse.errors import FormatError
from obdfuse.image import open_image
from obdfuse.layers.header import LsmtHeader
from obdfuse.layers.segment import INVALID_ENTRY, decode
from obdfuse.layers.stack import Stack
from obdfuse.layers.writable import WritableLayer

MIB = 1 << 20


def read_all(layer: WritableLayer) -> bytes:
    async def go():
        stack = Stack([], layer)
        return await stack.pread(0, stack.size)

    return trio.run(go)


def test_create_writes_overlaybd_headers(tmp_path):
    layer = WritableLayer.create(
        tmp_path / "d", tmp_path / "i", 64 * MIB, parent_uuid="c02fb491-b4d4-4904-8684-a014d032af78"
    )
    layer.close()
    data_hdr = LsmtHeader.unpack((tmp_path / "d").read_bytes()[:4096], "d")
    idx_hdr = LsmtHeader.unpack((tmp_path / "i").read_bytes()[:4096], "i")
    assert data_hdr.flags == 0x03 and idx_hdr.flags == 0x01
    assert idx_hdr.index_offset == 4096 and data_hdr.index_offset == 0
    assert data_hdr.uuid == idx_hdr.uuid and data_hdr.virtual_size == 64 * MIB
    assert data_hdr.parent_uuid == "C02FB491-B4D4-4904-8684-A014D032AF78"
    assert (tmp_path / "d").stat().st_size == 4096


def test_writes_append_and_later_wins(tmp_path):
    layer = WritableLayer.create(tmp_path / "d", tmp_path / "i", MIB)
    layer.write(0, b"a" * 4096)
    layer.write(1024, b"b" * 512)
    layer.discard(2048, 1024)
    layer.flush()
    layer.close()
    raw = (tmp_path / "i").read_bytes()[4096:]
    log = decode(raw)
    assert log.offset.tolist() == [0, 2, 4]
    assert log.moffset.tolist() == [8, 16, 17]  # appended in order; discard = data EOF
    assert log.zeroed.tolist() == [False, False, True]
    layer = WritableLayer.open(tmp_path / "d", tmp_path / "i")
    disk = read_all(layer)
    assert disk[:1024] == b"a" * 1024
    assert disk[1024:1536] == b"b" * 512
    assert disk[1536:2048] == b"a" * 512
    assert disk[2048:3072] == bytes(1024)
    assert disk[3072:4096] == b"a" * 1024
    layer.close()


def test_large_write_splits_at_4_mib_and_discard_at_16383_sectors(tmp_path):
    layer = WritableLayer.create(tmp_path / "d", tmp_path / "i", 64 * MIB)
    payload = os.urandom(9 * MIB)
    layer.write(MIB, payload)
    layer.discard(0, 20 * MIB)
    layer.write(30 * MIB, payload)
    layer.close()
    log = decode((tmp_path / "i").read_bytes()[4096:])
    assert log.length.tolist()[:3] == [8192, 8192, 2048]
    zeroed = log.length[log.zeroed].tolist()
    assert zeroed == [16383, 16383, 20 * 2048 - 2 * 16383]
    layer = WritableLayer.open(tmp_path / "d", tmp_path / "i")
    disk = read_all(layer)
    assert disk[: 20 * MIB] == bytes(20 * MIB)
    assert disk[30 * MIB : 39 * MIB] == payload
    layer.close()


def test_unaligned_write_is_rejected_by_the_layer(tmp_path):
    layer = WritableLayer.create(tmp_path / "d", tmp_path / "i", MIB)
    with pytest.raises(ValueError, match="aligned"):
        layer.write(100, b"x" * 512)
    with pytest.raises(ValueError, match="outside"):
        layer.write(MIB, b"x" * 512)
    layer.close()


@pytest.mark.parametrize("cut", [1, 8, 15])
def test_torn_last_record_is_dropped(tmp_path, cut):
    layer = WritableLayer.create(tmp_path / "d", tmp_path / "i", MIB)
    layer.write(0, b"1" * 512)
    layer.write(512, b"2" * 512)
    layer.flush()
    layer.close()
    index = tmp_path / "i"
    os.truncate(index, index.stat().st_size - 16 + cut)  # crash mid-append of record 2
    layer = WritableLayer.open(tmp_path / "d", index)
    disk = read_all(layer)
    assert disk[:512] == b"1" * 512 and disk[512:1024] == bytes(512)
    # The torn bytes were cut off, so the next append lands on a record boundary.
    assert index.stat().st_size == 4096 + 16
    layer.write(1024, b"3" * 512)
    layer.close()
    layer = WritableLayer.open(tmp_path / "d", index)
    assert read_all(layer)[1024:1536] == b"3" * 512
    layer.close()


def test_zero_filled_tail_and_unflushed_entries_are_dropped(tmp_path):
    layer = WritableLayer.create(tmp_path / "d", tmp_path / "i", MIB)
    layer.write(0, b"1" * 512)
    layer.write(512, b"2" * 512)
    layer.close()
    # Crash: the data of the second write never reached the disk, the index did,
    # and the index file also grew by a zero-filled block.
    os.truncate(tmp_path / "d", 4096 + 512)
    with open(tmp_path / "i", "ab") as f:
        f.write(bytes(64))
    layer = WritableLayer.open(tmp_path / "d", tmp_path / "i")
    disk = read_all(layer)
    assert disk[:512] == b"1" * 512 and disk[512:1024] == bytes(512)
    layer.close()


def test_entry_past_data_in_the_middle_is_an_error(tmp_path):
    layer = WritableLayer.create(tmp_path / "d", tmp_path / "i", MIB)
    layer.write(0, b"1" * 512)
    layer.write(512, b"2" * 512)
    layer.close()
    raw = bytearray((tmp_path / "i").read_bytes())
    raw[4096 + 8 : 4096 + 16] = (10_000).to_bytes(8, "little")  # first entry: moffset far away
    (tmp_path / "i").write_bytes(raw)
    with pytest.raises(FormatError, match="past the end of the data file"):
        WritableLayer.open(tmp_path / "d", tmp_path / "i")


def test_invalid_padding_entries_in_the_log_are_skipped(tmp_path):
    layer = WritableLayer.create(tmp_path / "d", tmp_path / "i", MIB)
    layer.write(0, b"1" * 512)
    layer.close()
    with open(tmp_path / "i", "ab") as f:
        f.write(INVALID_ENTRY * 3)
    layer = WritableLayer.open(tmp_path / "d", tmp_path / "i")
    assert read_all(layer)[:512] == b"1" * 512
    layer.close()


def test_wrong_files_are_rejected(tmp_path):
    WritableLayer.create(tmp_path / "d", tmp_path / "i", MIB).close()
    with pytest.raises(FormatError, match="not an RW index file"):
        WritableLayer.open(tmp_path / "d", tmp_path / "d")
    with pytest.raises(FormatError, match="not an RW data file"):
        WritableLayer.open(tmp_path / "i", tmp_path / "i")
    with pytest.raises(FileExistsError):
        WritableLayer.create(tmp_path / "d", tmp_path / "i2", MIB)
    other = WritableLayer.create(tmp_path / "d2", tmp_path / "i2", MIB)
    other.close()
    with pytest.raises(FormatError, match="does not match"):
        WritableLayer.open(tmp_path / "d", tmp_path / "i2")


def test_read_only_layer_refuses_writes(tmp_path):
    WritableLayer.create(tmp_path / "d", tmp_path / "i", MIB).close()
    layer = WritableLayer.open(tmp_path / "d", tmp_path / "i", read_only=True)
    with pytest.raises(PermissionError):
        layer.write(0, bytes(512))
    layer.close()


def test_sparse_mode_index_rebuilt_from_extents(tmp_path):
    layer = WritableLayer.create(tmp_path / "d", tmp_path / "i", 64 * MIB, sparse=True)
    assert (tmp_path / "d").stat().st_size == 4096 + 64 * MIB
    assert (tmp_path / "i").stat().st_size == 0
    block = os.urandom(4096)
    layer.write(8192, block)
    layer.write(10 * MIB, block * 4)
    layer.discard(10 * MIB, 4096)
    assert read_all(layer)[10 * MIB : 10 * MIB + 4096] == bytes(4096)
    layer.flush()
    layer.close()
    hdr = LsmtHeader.unpack((tmp_path / "d").read_bytes()[:4096], "d")
    assert hdr.flags == 0x13
    layer = WritableLayer.open(tmp_path / "d", tmp_path / "i")
    assert layer.sparse
    segs = layer.flat_index().segs
    assert segs.offset.tolist() == [16, 10 * 2048 + 8]  # the punched block is unmapped
    assert segs.moffset.tolist() == [24, 10 * 2048 + 16]
    disk = read_all(layer)
    assert disk[8192 : 8192 + 4096] == block
    assert disk[10 * MIB + 4096 : 10 * MIB + 16384] == block * 3
    layer.close()


def test_sparse_extents_split_at_16383_sectors(tmp_path):
    layer = WritableLayer.create(tmp_path / "d", tmp_path / "i", 64 * MIB, sparse=True)
    layer.write(0, b"\1" * (20 * MIB))
    layer.close()
    layer = WritableLayer.open(tmp_path / "d", tmp_path / "i")
    assert layer.flat_index().segs.length.tolist() == [16383, 16383, 40960 - 2 * 16383]
    layer.close()


def test_upper_dir_is_created_and_size_checked(tmp_path):
    async def go():
        stack = await open_image_dir(tmp_path / "up", size=4 * MIB)
        await stack.pwrite(0, b"x" * 512)
        await stack.flush()
        await stack.aclose()
        stack = await open_image_dir(tmp_path / "up", size=4 * MIB)
        assert (await stack.pread(0, 512)) == b"x" * 512
        await stack.aclose()
        with pytest.raises(FormatError, match="virtual size"):
            await open_image_dir(tmp_path / "up", size=8 * MIB)

    trio.run(go)


async def open_image_dir(upper, size):
    """An image of only a writable upper: use an empty config."""
    config = upper.parent / "config.v1.json"
    config.write_text('{"lowers": []}')
    return await open_image(config, upper=upper, size=size)


CHILD = """
import sys
from obdfuse.layers.writable import WritableLayer
layer = WritableLayer.create(sys.argv[1], sys.argv[2], 64 << 20)
i = 0
while True:
    layer.write(i * 4096, bytes([i % 251 + 1]) * 4096)
    i += 1
    if i % 50 == 0:
        layer.flush()
        print(i, flush=True)
"""


def test_kill_9_keeps_flushed_writes_and_never_returns_wrong_bytes(tmp_path):
    import signal
    import subprocess
    import sys

    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(tmp_path / "d"), str(tmp_path / "i")],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        flushed = 0
        while flushed < 500:
            line = proc.stdout.readline()
            assert line, "child died"
            flushed = int(line)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        proc.stdout.close()
    layer = WritableLayer.open(tmp_path / "d", tmp_path / "i")
    disk = read_all(layer)
    layer.close()
    i = 0
    while True:
        block = disk[i * 4096 : (i + 1) * 4096]
        if block != bytes([i % 251 + 1]) * 4096:
            break
        i += 1
    assert i >= flushed  # every flushed write survived
    assert disk[i * 4096 :] == bytes(len(disk) - i * 4096)  # the rest: nothing, not garbage
