"""The `BlockDevice` interface: a virtual disk that front ends (FUSE, iSCSI) serve.

The merged layer `Stack` implements it; `RawFileDevice` serves a plain disk image
file (a baseline for benchmarks, and a stand-in backend for front-end tests).
"""

from __future__ import annotations

import os
from typing import Protocol, runtime_checkable

from obdfuse.blob import clamp
from obdfuse.fileio import pread_exact, punch_hole, pwrite_all

SECTOR = 512


@runtime_checkable
class BlockDevice(Protocol):
    """A virtual disk of `size` bytes.

    Reads of unmapped ranges return zeros. `pwrite`/`discard` raise
    PermissionError on a read-only device. `flush` makes every completed write
    durable. Offsets and lengths need not be sector-aligned: a device whose storage
    works in sectors does the read-modify-write of partial ones itself, serialised
    with all its writes, as several front ends (FUSE and iSCSI) may share it.
    """

    @property
    def size(self) -> int: ...

    @property
    def read_only(self) -> bool: ...

    async def pread(self, offset: int, length: int) -> bytes: ...

    async def pwrite(self, offset: int, data: bytes) -> None: ...

    async def discard(self, offset: int, length: int) -> None: ...

    async def flush(self) -> None: ...

    def allocated_bytes(self) -> int: ...

    async def aclose(self) -> None: ...


class RawFileDevice:
    """A plain (possibly sparse) disk image file as a BlockDevice."""

    def __init__(self, path: str | os.PathLike[str], *, read_only: bool = True) -> None:
        self.name = os.fspath(path)
        self._read_only = read_only
        flags = (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC
        self._fd = os.open(self.name, flags)
        self._size = os.fstat(self._fd).st_size

    @property
    def size(self) -> int:
        return self._size

    @property
    def read_only(self) -> bool:
        return self._read_only

    async def pread(self, offset: int, length: int) -> bytes:
        n = clamp(self._size, offset, length)
        return pread_exact(self._fd, n, offset, name=self.name) if n else b""

    async def pwrite(self, offset: int, data: bytes) -> None:
        self._check_write(offset, len(data))
        pwrite_all(self._fd, data, offset)

    async def discard(self, offset: int, length: int) -> None:
        self._check_write(offset, length)
        punch_hole(self._fd, offset, length)

    async def flush(self) -> None:
        if not self._read_only:
            os.fdatasync(self._fd)

    def allocated_bytes(self) -> int:
        return os.fstat(self._fd).st_blocks * 512

    async def aclose(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def _check_write(self, offset: int, length: int) -> None:
        if self._read_only:
            raise PermissionError(f"{self.name} is read-only")
        if offset < 0 or length < 0 or offset + length > self._size:
            raise ValueError(f"write {offset}+{length} outside the device of {self._size} bytes")
