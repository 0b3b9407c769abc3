"""The `Blob` interface: a read-only byte source of known size, read with async pread.

Every byte source (local file, slice of a tar, registry blob, cache) is a Blob,
so formats compose by wrapping Blobs. No format logic lives here.
"""

from __future__ import annotations

import os
from typing import Protocol, runtime_checkable

from obdfuse.errors import FormatError
from obdfuse.fileio import pread_exact


@runtime_checkable
class Blob(Protocol):
    """A read-only byte source.

    `pread` returns exactly `length` bytes, fewer only when the range crosses
    `size` (empty at or past the end). It raises on IO or integrity errors and
    never returns wrong bytes.
    """

    name: str

    @property
    def size(self) -> int: ...

    async def pread(self, offset: int, length: int) -> bytes: ...

    async def aclose(self) -> None: ...


def clamp(size: int, offset: int, length: int) -> int:
    """Number of bytes a pread(offset, length) may return from an object of `size` bytes."""
    if offset < 0 or length < 0:
        raise ValueError(f"negative offset or length: {offset}, {length}")
    return max(0, min(length, size - offset))


class FileBlob:
    """A local file (or a part of it) as a Blob, read with os.pread."""

    def __init__(self, path: str | os.PathLike[str], *, fd: int | None = None) -> None:
        self.name = os.fspath(path)
        self._fd = fd if fd is not None else os.open(self.name, os.O_RDONLY | os.O_CLOEXEC)
        self._size = os.fstat(self._fd).st_size

    @property
    def size(self) -> int:
        return self._size

    def fileno(self) -> int:
        return self._fd

    async def pread(self, offset: int, length: int) -> bytes:
        return self.pread_sync(offset, length)

    def pread_sync(self, offset: int, length: int) -> bytes:
        """Blocking pread; the data of local files is usually in the page cache."""
        n = clamp(self._size, offset, length)
        if n == 0:
            return b""
        return pread_exact(self._fd, n, offset, name=self.name)

    async def aclose(self) -> None:
        self.close()

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class BytesBlob:
    """An in-memory Blob (small metadata, tests)."""

    def __init__(self, data: bytes, name: str = "<bytes>") -> None:
        self.name = name
        self._data = memoryview(bytes(data))

    @property
    def size(self) -> int:
        return len(self._data)

    async def pread(self, offset: int, length: int) -> bytes:
        n = clamp(len(self._data), offset, length)
        return bytes(self._data[offset : offset + n])

    async def aclose(self) -> None:
        return None


class SliceBlob:
    """A window [start, start+size) of another Blob, e.g. the payload of a tar wrapper."""

    def __init__(self, inner: Blob, start: int, size: int, name: str | None = None) -> None:
        if start < 0 or size < 0 or start + size > inner.size:
            raise FormatError(
                f"{inner.name}: window {start}+{size} exceeds the blob size {inner.size}"
            )
        self.name = name or inner.name
        self.inner = inner
        self.start = start
        self._size = size

    @property
    def size(self) -> int:
        return self._size

    async def pread(self, offset: int, length: int) -> bytes:
        n = clamp(self._size, offset, length)
        if n == 0:
            return b""
        return await self.inner.pread(self.start + offset, n)

    async def aclose(self) -> None:
        await self.inner.aclose()
