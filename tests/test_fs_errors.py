"""ImageFS's single errno boundary, driven directly (no kernel needed for the mapping)."""

from __future__ import annotations

import errno
import json
import logging
import os

import pyfuse3
import pytest
import trio
import trio.testing

from obdfuse.device import RawFileDevice
from obdfuse.errors import CorruptDataError, RemoteError
from obdfuse.fs import IMAGE_INODE, ROOT_INODE, STAT_INODE, ImageFS
from obdfuse.layers.stack import Stack
from obdfuse.layers.writable import WritableLayer
from tests.support.layers import commit_to


class FailingDevice:
    """A 1 MiB device whose reads fail with a chosen exception past 512 KiB."""

    size = 1 << 20
    read_only = True

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc

    async def pread(self, offset: int, length: int) -> bytes:
        if offset + length > self.size // 2:
            raise self.exc
        return b"\0" * length

    async def pwrite(self, offset: int, data: bytes) -> None:
        raise PermissionError("read-only")

    async def discard(self, offset: int, length: int) -> None:
        raise PermissionError("read-only")

    async def flush(self) -> None:
        return None

    def allocated_bytes(self) -> int:
        return 0

    async def aclose(self) -> None:
        return None


def _read(fs: ImageFS, off: int, size: int) -> bytes:
    async def go() -> bytes:
        info = await fs.open(IMAGE_INODE, os.O_RDONLY, None)
        try:
            return await fs.read(info.fh, off, size)
        finally:
            await fs.release(info.fh)

    return trio.run(go)


@pytest.mark.parametrize(
    "exc, code",
    [
        (CorruptDataError("layer sha256:ab at 0x1000: checksum mismatch"), errno.EIO),
        (RemoteError("registry 127.0.0.1:1 unreachable"), errno.EIO),
        (OSError(errno.ENOSPC, "No space left on device"), errno.ENOSPC),
        (PermissionError("read-only"), errno.EROFS),
        (KeyError("bug"), errno.EIO),
    ],
)
def test_exceptions_become_one_errno(exc, code, caplog):
    fs = ImageFS(FailingDevice(exc))
    assert _read(fs, 0, 4096) == b"\0" * 4096
    with caplog.at_level(logging.ERROR, logger="obdfuse.fs"):
        for _ in range(3):
            with pytest.raises(pyfuse3.FUSEError) as err:
                _read(fs, 600_000, 4096)
            assert err.value.errno == code
    assert fs.counters.errors == 3
    logged = [r for r in caplog.records if r.name == "obdfuse.fs"]
    assert len(logged) == 1  # the same failure is logged once, with its details
    assert str(exc).strip("'") in logged[0].getMessage()


def test_writes_to_a_read_only_device_are_refused(tmp_path):
    disk = tmp_path / "d.raw"
    disk.write_bytes(b"\0" * 8192)
    fs = ImageFS(RawFileDevice(disk, read_only=True))

    async def go() -> None:
        with pytest.raises(pyfuse3.FUSEError) as err:
            await fs.open(IMAGE_INODE, os.O_RDWR, None)
        assert err.value.errno == errno.EROFS
        with pytest.raises(pyfuse3.FUSEError) as err:
            await fs.open(ROOT_INODE, os.O_RDONLY, None)
        assert err.value.errno == errno.EISDIR

    trio.run(go)


def test_stat_file_is_hidden_but_found(tmp_path):
    disk = tmp_path / "d.raw"
    disk.write_bytes(b"\0" * 8192)
    fs = ImageFS(RawFileDevice(disk), image_name="d.raw")
    fs.stat_providers.append(lambda: {"cache": {"hits": 5}})

    async def go() -> bytes:
        attrs = await fs.lookup(ROOT_INODE, b".obdfuse-stat", None)
        assert attrs.st_ino == STAT_INODE
        info = await fs.open(STAT_INODE, os.O_RDONLY, None)
        assert info.direct_io
        return await fs.read(info.fh, 0, 1 << 16)

    doc = json.loads(trio.run(go))
    assert doc["image"] == "d.raw" and doc["size"] == 8192 and doc["cache"] == {"hits": 5}


def test_image_handles_need_no_state_so_a_new_process_can_serve_them(tmp_path):
    """A handle opened on one ImageFS works on a fresh one (a /dev/fuse takeover)."""
    disk = tmp_path / "d.raw"
    disk.write_bytes(bytes(range(256)) * 32)

    async def go() -> None:
        first = ImageFS(RawFileDevice(disk, read_only=False))
        ro = (await first.open(IMAGE_INODE, os.O_RDONLY, None)).fh
        rw = (await first.open(IMAGE_INODE, os.O_RDWR, None)).fh
        successor = ImageFS(RawFileDevice(disk, read_only=False))
        assert await successor.read(ro, 256, 4) == bytes([0, 1, 2, 3])
        assert await successor.write(rw, 512, b"\xff" * 512) == 512
        await successor.fsync(rw, True)
        assert await successor.read(ro, 512, 2) == b"\xff\xff"
        with pytest.raises(pyfuse3.FUSEError) as err:
            await successor.write(ro, 0, b"x" * 512)
        assert err.value.errno == errno.EBADF

    trio.run(go)


class SlowFlushDevice(FailingDevice):
    """A writable device whose flush takes a while (e.g. fdatasync in a worker thread)."""

    read_only = False

    def __init__(self) -> None:
        super().__init__(OSError(errno.EIO, "unused"))
        self.durable = False
        self.flushes = 0

    async def pwrite(self, offset: int, data: bytes) -> None:
        self.durable = False

    async def flush(self) -> None:
        self.flushes += 1
        await trio.sleep(0.05)
        self.durable = True


def test_an_fsync_never_returns_before_the_flush_in_flight_is_done():
    device = SlowFlushDevice()
    fs = ImageFS(device)
    seen: list[bool] = []

    async def fsync() -> None:
        await fs.fsync(IMAGE_INODE, False)
        seen.append(device.durable)  # every returned fsync must find the data durable

    async def go() -> None:
        info = await fs.open(IMAGE_INODE, os.O_RDWR, None)
        await fs.write(info.fh, 0, b"x" * 512)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(fsync)
            await trio.sleep(0.01)  # the second fsync arrives while the first one flushes
            nursery.start_soon(fsync)
        await fs.release(info.fh)

    trio.run(go)
    assert seen == [True, True]
    assert device.flushes == 1  # the second fsync had nothing new to flush


class SlowBlob:
    """A Blob whose reads yield to other tasks first (like a thread or the network)."""

    def __init__(self, inner) -> None:
        self.inner, self.name, self.size = inner, inner.name, inner.size

    async def pread(self, offset: int, length: int) -> bytes:
        await trio.sleep(0.02)
        return await self.inner.pread(offset, length)

    async def aclose(self) -> None:
        await self.inner.aclose()


async def slow_writable_stack(tmp_path) -> Stack:
    """A writable Stack over a lower whose reads are slow (so a read-modify-write yields)."""
    base = WritableLayer.create(tmp_path / "bd", tmp_path / "bi", 1 << 20)
    base.write(0, b"o" * 4096)
    lower = await commit_to(base, tmp_path / "lower")
    base.close()
    lower.blob = SlowBlob(lower.blob)
    return Stack([lower], WritableLayer.create(tmp_path / "ud", tmp_path / "ui", 1 << 20))


def test_an_aligned_write_is_not_undone_by_a_concurrent_read_modify_write(tmp_path):
    async def go() -> bytes:
        device = await slow_writable_stack(tmp_path)
        fs = ImageFS(device)
        info = await fs.open(IMAGE_INODE, os.O_RDWR, None)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(fs.write, info.fh, 10, b"u" * 10)  # RMW of sector 0
            await trio.sleep(0.005)  # ... which is now waiting for its read
            nursery.start_soon(fs.write, info.fh, 0, b"w" * 512)  # all of sector 0
        await fs.release(info.fh)
        sector = await device.pread(0, 512)
        await device.aclose()
        return sector

    sector = trio.run(go)
    # Either order is fine; a mix with the sector's old bytes is not.
    assert sector in (b"w" * 512, b"w" * 10 + b"u" * 10 + b"w" * 492), sector[:32]


def test_a_fuse_read_modify_write_does_not_undo_a_concurrent_iscsi_write(tmp_path):
    """FUSE and iSCSI (`mount --iscsi`) write to one Stack: a FUSE read-modify-write must
    be serialised with the iSCSI target's aligned writes too, so the device owns it."""

    async def go() -> bytes:
        device = await slow_writable_stack(tmp_path)
        fs = ImageFS(device)
        info = await fs.open(IMAGE_INODE, os.O_RDWR, None)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(fs.write, info.fh, 10, b"u" * 10)  # RMW of sector 0
            await trio.testing.wait_all_tasks_blocked()  # ... now waiting for its read
            await device.pwrite(0, b"i" * 512)  # what the iSCSI target does: whole sectors
        await fs.release(info.fh)
        sector = await device.pread(0, 512)
        await device.aclose()
        return sector

    sector = trio.run(go)
    # The iSCSI write came second: the stale read-modify-write must not undo it.
    assert sector == b"i" * 512, sector[:32]
