"""On-disk state of one cached blob: a sparse data file plus a chunk presence map.

Files under `<cache_dir>/blobs/`: `<hex>.data` (sparse, blob-sized, bytes at
blob offsets) and `<hex>.map` (a 32-byte header then one bit per chunk).

Crash safety: a chunk's bit is written only after its data has been
fdatasync'ed, so a bit on disk always means the chunk is fully there; a bit
lost in a crash only costs a refetch. Eviction clears the bit and syncs the
map *before* punching the data, so a crash never leaves a set bit over a hole.
Blocking IO: call from a worker thread (writes) or accept a short block.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import fcntl
import hashlib
import os
import struct
import threading
from pathlib import Path

from obdfuse.errors import FormatError

MAP_MAGIC = b"OBDCMAP1"
MAP_HEADER = struct.Struct("<8sQQII")  # magic, blob size, chunk size, flags, reserved
MAP_HEADER_SIZE = 32
FLAG_VERIFIED = 1
MAX_BLOB_SIZE = 1 << 42  # 4 TiB: bounds the presence map before it is allocated

_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong]


def punch_hole(fd: int, offset: int, length: int) -> None:
    """Deallocate [offset, offset+length) of a file, keeping its size (reads give zeros)."""
    if _libc.fallocate(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


class BlobBusy(Exception):
    """Another process (or cache instance) holds this blob's files."""


class BlobFiles:
    """The data file and presence map of one blob; thread-safe bit updates.

    An exclusive flock on `<hex>.lock` (held while open) makes one process the
    owner of the blob's files: others never read, write or evict them.
    """

    def __init__(self, root: Path, digest: str, size: int, chunk_size: int) -> None:
        hexd = digest.split(":", 1)[1]
        self.digest = digest
        self.size = size
        self.chunk_size = chunk_size
        self.nchunks = (size + chunk_size - 1) // chunk_size
        self.data_path = root / f"{hexd}.data"
        self.map_path = root / f"{hexd}.map"
        self.lock_path = root / f"{hexd}.lock"
        self._lock = threading.Lock()
        if size < 0 or size > MAX_BLOB_SIZE:
            raise FormatError(f"{digest}: blob size {size} is beyond the cache's limit "
                              f"of {MAX_BLOB_SIZE} bytes")
        self.verified = False
        self.bits = bytearray((self.nchunks + 7) // 8)
        self.present_count = 0
        self.data_fd = -1
        self.map_fd = -1
        self.lock_fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(self.lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.lock_fd)
            self.lock_fd = -1
            raise BlobBusy(f"{self.map_path} is in use by another obdfuse process") from None
        try:
            if not self._load():
                self._create()
        except BaseException:
            self.close()
            raise

    # ---------------------------------------------------------------- life

    @staticmethod
    def read_header(map_path: Path) -> tuple[int, int, int] | None:
        """(blob size, chunk size, flags) of an existing map, or None if unusable."""
        try:
            with open(map_path, "rb") as fh:
                head = fh.read(MAP_HEADER_SIZE)
        except OSError:
            return None
        if len(head) < MAP_HEADER.size:
            return None
        magic, size, chunk, flags, _ = MAP_HEADER.unpack_from(head)
        if magic != MAP_MAGIC or chunk <= 0:
            return None
        return size, chunk, flags

    def _load(self) -> bool:
        header = self.read_header(self.map_path)
        if header is None or header[:2] != (self.size, self.chunk_size):
            return False
        try:
            data_fd = os.open(self.data_path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            return False
        if os.fstat(data_fd).st_size != self.size:
            os.close(data_fd)
            return False
        map_fd = os.open(self.map_path, os.O_RDWR | os.O_CLOEXEC)
        stored = os.pread(map_fd, len(self.bits), MAP_HEADER_SIZE)
        self.bits[: len(stored)] = stored
        self._clear_tail_bits()
        self.present_count = sum(bin(b).count("1") for b in self.bits)
        self.verified = bool(header[2] & FLAG_VERIFIED) and self.complete
        self.data_fd, self.map_fd = data_fd, map_fd
        return True

    def _create(self) -> None:
        self.map_path.unlink(missing_ok=True)  # the map first: never a map over stale data
        self.data_path.unlink(missing_ok=True)
        self.data_fd = os.open(self.data_path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC,
                               0o600)
        os.ftruncate(self.data_fd, self.size)
        tmp = self.map_path.with_suffix(".map.tmp")
        with open(tmp, "wb") as fh:
            fh.write(MAP_HEADER.pack(MAP_MAGIC, self.size, self.chunk_size, 0, 0).ljust(
                MAP_HEADER_SIZE, b"\0"))
            fh.write(bytes(len(self.bits)))
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.map_path)
        _fsync_dir(self.map_path.parent)
        self.map_fd = os.open(self.map_path, os.O_RDWR | os.O_CLOEXEC)

    def close(self) -> None:
        for fd in (self.data_fd, self.map_fd, self.lock_fd):  # the lock goes last
            if fd >= 0:
                os.close(fd)
        self.data_fd = self.map_fd = self.lock_fd = -1

    def remove(self) -> None:
        self.close()
        self.map_path.unlink(missing_ok=True)
        self.data_path.unlink(missing_ok=True)

    # ---------------------------------------------------------------- bits

    def _clear_tail_bits(self) -> None:
        extra = len(self.bits) * 8 - self.nchunks
        if extra and self.bits:
            self.bits[-1] &= 0xFF >> extra

    def present(self, index: int) -> bool:
        return bool(self.bits[index >> 3] & (1 << (index & 7)))

    def present_indices(self) -> list[int]:
        return [i for i in range(self.nchunks) if self.present(i)]

    @property
    def complete(self) -> bool:
        return self.present_count == self.nchunks

    def chunk_bytes(self, index: int) -> int:
        return min(self.chunk_size, self.size - index * self.chunk_size)

    def _write_bits(self, first: int, last: int) -> None:
        lo, hi = first >> 3, (last >> 3) + 1
        os.pwrite(self.map_fd, bytes(self.bits[lo:hi]), MAP_HEADER_SIZE + lo)

    # ---------------------------------------------------------------- data

    def read(self, offset: int, length: int) -> bytes:
        data = os.pread(self.data_fd, length, offset)
        if len(data) != length:
            raise OSError(f"{self.data_path}: short read at {offset}")
        return data

    def store(self, first_chunk: int, data: bytes) -> None:
        """Write whole chunks starting at `first_chunk`, make them durable, then mark them."""
        offset = first_chunk * self.chunk_size
        last = (offset + len(data) - 1) // self.chunk_size
        expected = sum(self.chunk_bytes(i) for i in range(first_chunk, last + 1))
        if len(data) != expected:
            raise ValueError(f"store of {len(data)} bytes is not whole chunks")
        view = memoryview(data)
        done = 0
        while done < len(data):
            done += os.pwrite(self.data_fd, view[done:], offset + done)
        os.fdatasync(self.data_fd)  # data durable before any bit says so
        with self._lock:
            for i in range(first_chunk, last + 1):
                if not self.present(i):
                    self.bits[i >> 3] |= 1 << (i & 7)
                    self.present_count += 1
            self._write_bits(first_chunk, last)

    def evict(self, indices: list[int]) -> None:
        """Forget chunks: clear and sync their bits, then punch their data."""
        if not indices:
            return
        with self._lock:
            for i in indices:
                if self.present(i):
                    self.bits[i >> 3] &= ~(1 << (i & 7)) & 0xFF
                    self.present_count -= 1
            self._write_bits(min(indices), max(indices))
            self._set_verified(False)
            os.fdatasync(self.map_fd)
        for i in indices:
            punch_hole(self.data_fd, i * self.chunk_size, self.chunk_bytes(i))

    def drop_all(self) -> None:
        self.evict(self.present_indices())

    def _set_verified(self, value: bool) -> None:
        self.verified = value
        os.pwrite(self.map_fd, struct.pack("<I", FLAG_VERIFIED if value else 0), 24)

    def mark_verified(self) -> None:
        with self._lock:
            self._set_verified(True)

    def sha256(self) -> str:
        """Digest of the data file (call only when complete)."""
        h = hashlib.sha256()
        offset = 0
        while offset < self.size:
            piece = os.pread(self.data_fd, min(4 << 20, self.size - offset), offset)
            if not piece:
                raise OSError(f"{self.data_path}: short read while verifying at {offset}")
            h.update(piece)
            offset += len(piece)
        return "sha256:" + h.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
