"""The writable (RW) LSMT layer: append mode and sparse mode (spec §3.5, §3.7).

Append mode: a data file (4096-byte header + appended write payloads) and an
index file (4096-byte header + an append log of 16-byte mappings, later wins).
Sparse mode: the data file *is* the disk, shifted by its 4096-byte header;
the index is rebuilt from the file's allocated extents on open.

Durability: `flush()` fdatasyncs the data file before the index file, so a
durable index entry never points at data that is not durable. A crash can
leave a torn last index record (dropped on open) or index entries for data
that never reached the disk (unflushed writes at the end of the log; dropped).
"""

from __future__ import annotations

import errno
import logging
import os
import struct
from pathlib import Path

import numpy as np

from obdfuse.errors import FormatError
from obdfuse.fileio import punch_hole, pwrite_all
from obdfuse.layers.header import (
    FLAG_DATA,
    FLAG_HEADER,
    FLAG_SEALED,
    MAX_RW_INDEX_SIZE,
    RW_DATA_FLAGS,
    RW_INDEX_FLAGS,
    RW_SPARSE_DATA_FLAGS,
    SLOT_SIZE,
    LsmtHeader,
    normalize_uuid,
    random_uuid,
)
from obdfuse.layers.index import MutableSegmentIndex, SegmentIndex, resolve_log
from obdfuse.layers.segment import (
    ENTRY_SIZE,
    MAX_LENGTH,
    SECTOR,
    Segments,
    decode,
    make_segments,
)

log = logging.getLogger(__name__)

_ENTRY = struct.Struct("<QQ")  # one SegmentMapping (lo, hi), tag 0 (§3.3)
MAX_IO_SIZE = 4 << 20  # writes are split into 4 MiB pieces (§3.5)
HEADER_SECTORS = SLOT_SIZE // SECTOR


class WritableLayer:
    """A writable layer; all offsets are bytes on the virtual disk, sector-aligned."""

    def __init__(
        self,
        data_path: Path,
        index_path: Path | None,
        data_fd: int,
        index_fd: int | None,
        header: LsmtHeader,
        index: MutableSegmentIndex,
        *,
        read_only: bool,
    ) -> None:
        self.data_path = data_path
        self.index_path = index_path
        self._data_fd = data_fd
        self._index_fd = index_fd
        self.header = header
        self.index = index
        self.read_only = read_only
        self.sparse = header.is_sparse
        self._data_end = _round_up(os.fstat(data_fd).st_size, SECTOR)
        self._index_end = os.fstat(index_fd).st_size if index_fd is not None else 0
        self.name = str(data_path)

    # ---- creation and opening ---------------------------------------------------------

    @classmethod
    def create(
        cls,
        data_path: str | os.PathLike[str],
        index_path: str | os.PathLike[str],
        virtual_size: int,
        *,
        uuid: str | None = None,
        parent_uuid: str | None = None,
        sparse: bool = False,
    ) -> WritableLayer:
        """Create a new, empty writable layer (fails if either file exists)."""
        if virtual_size <= 0 or virtual_size % SECTOR:
            raise ValueError(f"virtual size {virtual_size} must be a positive multiple of 512")
        data_path, index_path = Path(data_path), Path(index_path)
        hdr = LsmtHeader(
            flags=RW_SPARSE_DATA_FLAGS if sparse else RW_DATA_FLAGS,
            virtual_size=virtual_size,
            uuid=normalize_uuid(uuid) if uuid else random_uuid(),
            parent_uuid=normalize_uuid(parent_uuid),
        )
        flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
        data_fd = os.open(data_path, flags, 0o644)
        try:
            index_fd = os.open(index_path, flags, 0o644)
        except BaseException:
            os.close(data_fd)
            data_path.unlink()
            raise
        try:
            os.pwrite(data_fd, hdr.pack(), 0)
            if sparse:
                os.ftruncate(data_fd, SLOT_SIZE + virtual_size)
            else:
                idx_hdr = hdr.replace(flags=RW_INDEX_FLAGS, index_offset=SLOT_SIZE)
                os.pwrite(index_fd, idx_hdr.pack(), 0)
            os.fsync(data_fd)
            os.fsync(index_fd)
        except BaseException:
            os.close(data_fd)
            os.close(index_fd)
            data_path.unlink(missing_ok=True)
            index_path.unlink(missing_ok=True)
            raise
        index = MutableSegmentIndex()
        return cls(data_path, index_path, data_fd, index_fd, hdr, index, read_only=False)

    @classmethod
    def open(
        cls,
        data_path: str | os.PathLike[str],
        index_path: str | os.PathLike[str] | None = None,
        *,
        read_only: bool = False,
    ) -> WritableLayer:
        """Open an existing writable layer, replaying its index log."""
        data_path = Path(data_path)
        mode = os.O_RDONLY if read_only else os.O_RDWR
        data_fd = os.open(data_path, mode | os.O_CLOEXEC)
        index_fd = None
        try:
            data_hdr = LsmtHeader.unpack(os.pread(data_fd, SLOT_SIZE, 0), f"{data_path}: header")
            if not (data_hdr.flags & FLAG_HEADER and data_hdr.flags & FLAG_DATA):
                raise FormatError(f"{data_path}: flags {data_hdr.flags:#x}: not an RW data file")
            if data_hdr.flags & FLAG_SEALED:
                raise FormatError(f"{data_path}: is a sealed layer, not a writable one")
            if data_hdr.is_sparse:
                index = MutableSegmentIndex(_sparse_extents(data_fd))
                if index_path is not None and Path(index_path).exists():
                    index_fd = os.open(index_path, mode | os.O_CLOEXEC)
                return cls(
                    data_path,
                    Path(index_path) if index_path else None,
                    data_fd,
                    index_fd,
                    data_hdr,
                    index,
                    read_only=read_only,
                )
            if index_path is None:
                raise FormatError(f"{data_path}: an append-mode layer needs its index file")
            index_path = Path(index_path)
            index_fd = os.open(index_path, mode | os.O_CLOEXEC)
            hdr, segs = _load_index_log(
                index_fd, index_path, data_size=os.fstat(data_fd).st_size, repair=not read_only
            )
            if hdr.uuid != data_hdr.uuid:
                raise FormatError(
                    f"{index_path}: uuid {hdr.uuid} does not match data file uuid {data_hdr.uuid}"
                )
            index = MutableSegmentIndex(resolve_log(segs.with_tag(0)))  # tags: ignore on read
            return cls(data_path, index_path, data_fd, index_fd, hdr, index, read_only=read_only)
        except BaseException:
            os.close(data_fd)
            if index_fd is not None:
                os.close(index_fd)
            raise

    # ---- properties ---------------------------------------------------------------------

    @property
    def virtual_size(self) -> int:
        return self.header.virtual_size

    @property
    def uuid(self) -> str:
        return self.header.uuid

    @property
    def parent_uuid(self) -> str:
        return self.header.parent_uuid

    def flat_index(self) -> SegmentIndex:
        """The resolved index as one flat SegmentIndex (later writes win)."""
        return self.index.flat()

    def commit_segments(self) -> Segments:
        """The resolved index as a commit source (tag 0)."""
        return self.index.flat().segs

    async def read_tagged(self, tag: int, moffset: int, count: int) -> bytes:
        return self.read_sectors_sync(moffset, count)

    def set_virtual_size(self, virtual_size: int) -> None:
        """Rewrite virtual_size in both headers (overlaybd `update_vsize`)."""
        self._check_writable()
        self.header = self.header.replace(virtual_size=virtual_size)
        os.pwrite(self._data_fd, self.header.pack(), 0)
        if self.sparse:
            os.ftruncate(self._data_fd, SLOT_SIZE + virtual_size)
        elif self._index_fd is not None:
            idx = self.header.replace(flags=RW_INDEX_FLAGS, index_offset=SLOT_SIZE)
            os.pwrite(self._index_fd, idx.pack(), 0)

    # ---- IO -----------------------------------------------------------------------------

    def read_sectors_sync(self, moffset: int, count: int) -> bytes:
        """`count` sectors of the data file at sector `moffset` (exactly, or raise)."""
        want = count * SECTOR
        data = os.pread(self._data_fd, want, moffset * SECTOR)
        if len(data) < want:
            if self.sparse:  # a sparse file may be shorter than its mapped range
                return data + bytes(want - len(data))
            raise FormatError(
                f"{self.data_path}: short read at byte {moffset * SECTOR} "
                f"({len(data)} of {want} bytes)"
            )
        return data

    async def read_sectors(self, moffset: int, count: int) -> bytes:
        return self.read_sectors_sync(moffset, count)

    def write(self, offset: int, data: bytes | memoryview) -> None:
        """Write sector-aligned `data` at byte `offset` of the virtual disk."""
        self._check_range(offset, len(data))
        view = memoryview(data)
        for pos in range(0, len(view), MAX_IO_SIZE):
            piece = view[pos : pos + MAX_IO_SIZE]
            at = offset + pos
            if self.sparse:
                pwrite_all(self._data_fd, piece, SLOT_SIZE + at)
                self.index.insert(at // SECTOR, len(piece) // SECTOR, (SLOT_SIZE + at) // SECTOR)
                continue
            moffset = self._data_end // SECTOR
            pwrite_all(self._data_fd, piece, self._data_end)
            self._data_end += len(piece)
            self._append_log(at // SECTOR, len(piece) // SECTOR, moffset, zeroed=False)

    def discard(self, offset: int, length: int) -> None:
        """Make a sector-aligned range read as zeros (shadowing lower layers)."""
        self._check_range(offset, length)
        if self.sparse:
            punch_hole(self._data_fd, SLOT_SIZE + offset, length)
        start, end = offset // SECTOR, (offset + length) // SECTOR
        for s in range(start, end, MAX_LENGTH):
            n = min(MAX_LENGTH, end - s)
            if self.sparse:
                self.index.insert(s, n, (SLOT_SIZE // SECTOR) + s, zeroed=True)
            else:
                self._append_log(s, n, self._data_end // SECTOR, zeroed=True)

    def flush(self) -> None:
        """Make every completed write durable: data first, then the index."""
        if self.read_only:
            return
        os.fdatasync(self._data_fd)
        if self._index_fd is not None:
            os.fdatasync(self._index_fd)

    def close(self) -> None:
        """Close the data and index files (no flush: call flush() first to persist)."""
        if self._data_fd >= 0:
            os.close(self._data_fd)
            self._data_fd = -1
        if self._index_fd is not None and self._index_fd >= 0:
            os.close(self._index_fd)
            self._index_fd = None

    def allocated_bytes(self) -> int:
        return self.index.flat().data_sectors() * SECTOR

    def _append_log(self, offset: int, length: int, moffset: int, *, zeroed: bool) -> None:
        entry = _ENTRY.pack(offset | (length << 50), moffset | (int(zeroed) << 55))
        assert self._index_fd is not None
        pwrite_all(self._index_fd, entry, self._index_end)
        self._index_end += ENTRY_SIZE
        self.index.insert(offset, length, moffset, zeroed)

    def _check_writable(self) -> None:
        if self.read_only:
            raise PermissionError(f"{self.data_path}: writable layer opened read-only")

    def _check_range(self, offset: int, length: int) -> None:
        self._check_writable()
        if offset % SECTOR or length % SECTOR:
            raise ValueError(f"write/discard {offset}+{length} is not 512-byte aligned")
        if offset < 0 or offset + length > self.virtual_size:
            raise ValueError(
                f"write/discard {offset}+{length} outside the virtual size {self.virtual_size}"
            )


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def _load_index_log(
    fd: int, path: Path, *, data_size: int, repair: bool
) -> tuple[LsmtHeader, Segments]:
    """Read an RW index file: header checks, torn-tail repair, bounds checks."""
    hdr = LsmtHeader.unpack(os.pread(fd, SLOT_SIZE, 0), f"{path}: header")
    if hdr.flags & FLAG_DATA or not hdr.flags & FLAG_HEADER or hdr.flags & FLAG_SEALED:
        raise FormatError(f"{path}: flags {hdr.flags:#x}: not an RW index file")
    if hdr.index_offset != SLOT_SIZE:
        raise FormatError(f"{path}: index offset {hdr.index_offset}, expected {SLOT_SIZE}")
    size = os.fstat(fd).st_size
    body = size - SLOT_SIZE
    if body < 0:
        raise FormatError(f"{path}: truncated header")
    count = body // ENTRY_SIZE
    if count > MAX_RW_INDEX_SIZE:
        raise FormatError(f"{path}: {count} log entries exceed the limit {MAX_RW_INDEX_SIZE}")
    raw = os.pread(fd, count * ENTRY_SIZE, SLOT_SIZE) if count else b""
    keep = count
    # A crash mid-append leaves a partial record, or trailing zero-filled records.
    arr = np.frombuffer(raw, dtype="<u8").reshape(-1, 2)
    while keep and not arr[keep - 1].any():
        keep -= 1
    segs_all = decode(raw[: keep * ENTRY_SIZE], keep_invalid=True)
    valid = segs_all.offset != (1 << 50) - 1
    # Entries for data that never reached the data file (unflushed at a crash) form a
    # suffix of the log because data is appended in log order: drop that suffix.
    data_sectors = data_size // SECTOR
    beyond = valid & (segs_all.mend > data_sectors)
    if beyond.any():
        first = int(np.argmax(beyond))
        later = valid[first:] & ~segs_all.zeroed[first:]
        if (segs_all.mend[first:][later] <= data_sectors).any():
            raise FormatError(f"{path}: log entry #{first} points past the end of the data file")
        keep = first
        segs_all = segs_all.take(slice(0, keep))
        valid = valid[:keep]
    dropped = count - keep
    if dropped or body % ENTRY_SIZE:
        log.warning(
            "%s: dropping %d torn/unflushed index record(s) and %d stray bytes at the end",
            path,
            dropped,
            body % ENTRY_SIZE,
        )
        if repair:
            os.ftruncate(fd, SLOT_SIZE + keep * ENTRY_SIZE)
    segs = segs_all.take(valid)
    bad = (segs.length <= 0) | (segs.moffset < HEADER_SECTORS)
    if bad.any():
        i = int(np.flatnonzero(valid)[np.argmax(bad)])
        raise FormatError(f"{path}: log entry #{i} has length 0 or points into the header")
    bad = segs.end * SECTOR > hdr.virtual_size
    if bad.any():
        i = int(np.flatnonzero(valid)[np.argmax(bad)])
        raise FormatError(f"{path}: log entry #{i} ends past the virtual size {hdr.virtual_size}")
    return hdr, segs


def _sparse_extents(fd: int) -> Segments:
    """Mappings of a sparse data file's allocated extents past its header (§3.7)."""
    size = os.fstat(fd).st_size
    starts: list[int] = []
    ends: list[int] = []
    pos = SLOT_SIZE
    while pos < size:
        try:
            begin = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:
                break
            raise
        end = os.lseek(fd, begin, os.SEEK_HOLE)
        begin = max(begin, SLOT_SIZE)
        if end > begin:
            starts.append(begin // SECTOR)
            ends.append(_round_up(end, SECTOR) // SECTOR)
        pos = end
    if not starts:
        return make_segments([], [], [])
    s, e = np.array(starts, dtype=np.int64), np.array(ends, dtype=np.int64)
    counts = -(-(e - s) // MAX_LENGTH)
    owner = np.repeat(np.arange(len(s)), counts)
    k = np.arange(int(counts.sum())) - (np.cumsum(counts) - counts)[owner]
    begin = s[owner] + k * MAX_LENGTH
    length = np.minimum(e[owner] - begin, MAX_LENGTH)
    return make_segments(begin - HEADER_SECTORS, length, begin)
