"""The merged view of a layer stack as a `BlockDevice` (spec §3.8).

Read-only lowers (bottom → top) are merged once, at open, into one flat index
whose tags name the layer each piece comes from; an optional writable upper
is looked up first. A read is: a few searchsorted calls, a short walk over the
pieces it covers, one blob read per run of pieces that are contiguous in the
same layer, zeros for holes and zeroed ranges.

Writes: sector-aligned writes go straight to the upper layer; unaligned writes
and discards are done as read-modify-write of the partial sectors.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import trio

from obdfuse.blob import clamp
from obdfuse.errors import CorruptDataError, FormatError, ObdfuseError
from obdfuse.layers.index import SegmentIndex, merge_stack, overlay
from obdfuse.layers.sealed import SealedLayer
from obdfuse.layers.segment import SECTOR, Segments
from obdfuse.layers.writable import WritableLayer

MAX_STACK_LAYERS = 255
UPPER_TAG = 255

# A piece of a lookup: (first sector, sector count, tag, moffset); tag None = zeros.
Piece = tuple[int, int, int, int]


class Stack:
    """Lowers (bottom first) plus an optional writable upper, served as one disk."""

    def __init__(
        self,
        lowers: Sequence[SealedLayer],
        upper: WritableLayer | None = None,
        *,
        read_only: bool | None = None,
        parallel_reads: bool = False,
    ) -> None:
        """`parallel_reads`: fetch the runs of one read concurrently (trio tasks); worth it
        when layers are remote, a waste of task overhead for local files."""
        if len(lowers) > MAX_STACK_LAYERS:
            raise FormatError(f"{len(lowers)} layers exceed the limit of {MAX_STACK_LAYERS}")
        self.lowers = list(lowers)
        self.upper = upper
        self.parallel_reads = parallel_reads
        self._write_lock = trio.Lock()
        self._rmw_active = 0
        self._read_only = upper is None or upper.read_only if read_only is None else read_only
        if not self._read_only and upper is None:
            raise ObdfuseError("a writable image needs an upper (writable) layer")
        self.merged = merge_stack(
            [layer.segments.with_tag(i) for i, layer in reversed(list(enumerate(self.lowers)))]
        )
        _ = self.merged.table  # build the lookup table now, not on the first read
        self._size = self._virtual_size()
        self._alloc_cache: tuple[int, int] | None = None

    def _virtual_size(self) -> int:
        # vsize = the top-most layer's virtual size that is > 0 (§3.8)
        if self.upper is not None and self.upper.virtual_size > 0:
            return self.upper.virtual_size
        for layer in reversed(self.lowers):
            if layer.virtual_size > 0:
                return layer.virtual_size
        return 0

    # ---- BlockDevice --------------------------------------------------------------------

    @property
    def size(self) -> int:
        return self._size

    @property
    def read_only(self) -> bool:
        return self._read_only

    async def pread(self, offset: int, length: int) -> bytes:
        """Exactly the bytes [offset, offset+length) of the disk (clamped at its end)."""
        n = clamp(self._size, offset, length)
        if n == 0:
            return b""
        s0 = offset // SECTOR
        s1 = -(-(offset + n) // SECTOR)
        skip = offset - s0 * SECTOR
        runs = self._lookup(s0, s1)
        if not runs:
            return bytes(n)
        if len(runs) == 1:
            start, count, tag, moff = runs[0]
            if start == s0 and count == s1 - s0:
                data = await self._source_read(tag, moff, count)
                return data if skip == 0 and len(data) == n else data[skip : skip + n]
        buf = bytearray((s1 - s0) * SECTOR)

        async def fill(start: int, count: int, tag: int, moff: int) -> None:
            pos = (start - s0) * SECTOR
            buf[pos : pos + count * SECTOR] = await self._source_read(tag, moff, count)

        if self.parallel_reads and len(runs) > 1:
            async with trio.open_nursery() as nursery:
                for run in runs:
                    nursery.start_soon(fill, *run)
        else:
            for run in runs:
                await fill(*run)
        if skip == 0 and len(buf) == n:
            return bytes(buf)
        return bytes(memoryview(buf)[skip : skip + n])

    async def pwrite(self, offset: int, data: bytes) -> None:
        upper = self._writable_upper()
        length = len(data)
        if offset < 0 or offset + length > self._size:
            raise ValueError(f"write {offset}+{length} outside the disk of {self._size} bytes")
        if length == 0:
            return
        if not (offset % SECTOR or length % SECTOR):
            await self._aligned(upper.write, offset, data)
            return
        # Read-modify-write of the partial sectors. Serialised with every other write
        # while it awaits its read, so no write can land in between and be lost.
        async with self._write_lock:
            self._rmw_active += 1
            try:
                s0 = offset // SECTOR * SECTOR
                s1 = -(-(offset + length) // SECTOR) * SECTOR
                merged = bytearray(await self.pread(s0, s1 - s0))
                merged[offset - s0 : offset - s0 + length] = data
                upper.write(s0, merged)
            finally:
                self._rmw_active -= 1

    async def discard(self, offset: int, length: int) -> None:
        upper = self._writable_upper()
        if offset < 0 or offset + length > self._size:
            raise ValueError(f"discard {offset}+{length} outside the disk of {self._size} bytes")
        a = -(-offset // SECTOR) * SECTOR
        b = (offset + length) // SECTOR * SECTOR
        if b <= a:
            await self.pwrite(offset, bytes(length))
            return
        if offset < a:
            await self.pwrite(offset, bytes(a - offset))
        await self._aligned(upper.discard, a, b - a)
        if offset + length > b:
            await self.pwrite(b, bytes(offset + length - b))

    async def _aligned(self, op, offset: int, arg) -> None:
        """Run a synchronous aligned write/discard, after any read-modify-write in flight."""
        if self._rmw_active:
            async with self._write_lock:
                op(offset, arg)
        else:
            op(offset, arg)

    async def flush(self) -> None:
        if self.upper is not None and not self._read_only:
            self.upper.flush()

    def allocated_bytes(self) -> int:
        """Bytes of the disk that map to data in some layer."""
        version = self.upper.index.version if self.upper is not None else 0
        if self._alloc_cache is None or self._alloc_cache[0] != version:
            self._alloc_cache = (version, self.flat_index().data_sectors() * SECTOR)
        return self._alloc_cache[1]

    async def aclose(self) -> None:
        """Close every layer, even if closing one fails or is cancelled; re-raise the
        first failure."""
        await close_layers(self.lowers, self.upper)

    # ---- whole-disk views (dump, commit of a stack) -------------------------------------

    def flat_index(self) -> SegmentIndex:
        """The upper over the merged lowers as one flat index (tags: lower index / 255)."""
        if self.upper is None:
            return self.merged
        top = self.upper.index.flat().segs.with_tag(UPPER_TAG)
        return SegmentIndex(overlay(top, self.merged.segs), check=False)

    @property
    def virtual_size(self) -> int:
        return self._size

    @property
    def uuid(self) -> str:
        return self._top().uuid

    @property
    def parent_uuid(self) -> str:
        """The parent of the bottom layer (what overlaybd-merge records)."""
        if self.lowers:
            return self.lowers[0].parent_uuid
        return self._top().parent_uuid

    def commit_segments(self) -> Segments:
        """The flattened index with tags as overlaybd-merge levels (0 = top-most)."""
        segs = self.flat_index().segs
        top = len(self.lowers) if self.upper is not None else len(self.lowers) - 1
        level = np.where(segs.tag == UPPER_TAG, 0, top - segs.tag.astype(np.int64))
        return Segments(segs.offset, segs.length, segs.moffset, segs.zeroed, level.astype(np.uint8))

    async def read_tagged(self, tag: int, moffset: int, count: int) -> bytes:
        top = len(self.lowers) if self.upper is not None else len(self.lowers) - 1
        source = UPPER_TAG if (self.upper is not None and tag == 0) else top - tag
        return await self._source_read(source, moffset, count)

    async def read_sectors_of(self, tag: int, moffset: int, count: int) -> bytes:
        """Raw data of the layer named by an index tag (lower index or UPPER_TAG)."""
        return await self._source_read(tag, moffset, count)

    def layer_extents(self, offset: int, length: int) -> list[tuple[int, int, int]]:
        """Where the bytes [offset, offset+length) of the disk live: (source, byte offset in
        the source's layer file, byte count) per data run, in disk order; source = lower
        index or UPPER_TAG. Holes and zeroed ranges are left out (prefetch planning)."""
        n = clamp(self._size, offset, length)
        if n == 0:
            return []
        s0, s1 = offset // SECTOR, -(-(offset + n) // SECTOR)
        return [(tag, moff * SECTOR, count * SECTOR)
                for _, count, tag, moff in self._lookup(s0, s1)]

    # ---- internals ----------------------------------------------------------------------

    def _top(self):
        if self.upper is not None:
            return self.upper
        if not self.lowers:
            raise FormatError("empty stack")
        return self.lowers[-1]

    def _writable_upper(self) -> WritableLayer:
        if self._read_only or self.upper is None:
            raise PermissionError("the image is read-only")
        return self.upper

    async def _source_read(self, tag: int, moffset: int, count: int) -> bytes:
        """Exactly `count` sectors of one layer's data, or CorruptDataError: a short
        result would shift every later byte of a read."""
        if tag == UPPER_TAG:
            assert self.upper is not None
            data = self.upper.read_sectors_sync(moffset, count)
        else:
            data = await self.lowers[tag].read_sectors(moffset, count)
        if len(data) != count * SECTOR:
            name = self.upper.data_path if tag == UPPER_TAG else self.lowers[tag].name
            raise CorruptDataError(
                f"{name}: read of layer data at byte "
                f"{moffset * SECTOR} returned {len(data)} of {count * SECTOR} bytes"
            )
        return data

    def _lookup(self, s0: int, s1: int) -> list[Piece]:
        """Data runs covering sectors [s0, s1), top layer first; coalesced per source."""
        pieces: list[Piece] = []
        if self.upper is not None:
            gaps = [(s0, s1)]
            for level in self.upper.index.levels():
                if not len(level):
                    continue
                gaps = _collect(level, gaps, UPPER_TAG, pieces)
                if not gaps:
                    break
        else:
            gaps = None
        if gaps is None:
            _collect(self.merged, [(s0, s1)], None, pieces)
        elif gaps:
            _collect(self.merged, gaps, None, pieces)
        if len(pieces) > 1:
            pieces.sort()
            pieces = _coalesce(pieces)
        return [p for p in pieces if p[2] >= 0]


async def close_layers(lowers: list[SealedLayer], upper: WritableLayer | None) -> None:
    """Close lowers then the upper. A failure of one, even a BaseException such as
    trio.Cancelled, does not skip the rest; the first one is re-raised at the end."""
    first: BaseException | None = None
    for layer in lowers:
        try:
            await layer.aclose()
        except BaseException as exc:  # re-raised below
            first = first or exc
    try:
        if upper is not None:
            upper.close()
    except BaseException as exc:  # re-raised below
        first = first or exc
    if first is not None:
        raise first


def _collect(
    index: SegmentIndex, gaps: list[tuple[int, int]], tag: int | None, out: list[Piece]
) -> list[tuple[int, int]]:
    """Append pieces of `index` inside `gaps` to `out`; return what is still unmapped.

    Zeroed mappings produce pieces with tag -1 so they hide lower layers.
    `tag` overrides the index's own source tags (for the upper layer).
    """
    left: list[tuple[int, int]] = []
    for g0, g1 in gaps:
        rows = index.rows(g0, g1)
        if not rows:
            left.append((g0, g1))
            continue
        pos = g0
        for off, end, moff, source in rows:
            a = off if off > g0 else g0
            b = end if end < g1 else g1
            if a > pos:
                left.append((pos, a))
            if source < 0:
                out.append((a, b - a, -1, 0))
            else:
                out.append((a, b - a, source if tag is None else tag, moff + a - off))
            pos = b
        if pos < g1:
            left.append((pos, g1))
    return left


def _coalesce(pieces: list[Piece]) -> list[Piece]:
    """Merge sorted pieces that are contiguous both on the disk and in the same source."""
    out = [pieces[0]]
    for p in pieces[1:]:
        start, count, tag, moff = out[-1]
        if tag == p[2] and tag >= 0 and start + count == p[0] and moff + count == p[3]:
            out[-1] = (start, count + p[1], tag, moff)
        else:
            out.append(p)
    return out
