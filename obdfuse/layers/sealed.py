"""Sealed (read-only) LSMT layers and layer-blob detection (spec §3.4, §4.2).

`open_layer(blob)` unwraps a tar wrapper and a ZFile when present, then reads
the LSMT trailer and index, rejecting hostile input before it is used.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from obdfuse.blob import Blob
from obdfuse.errors import FormatError
from obdfuse.layers.header import (
    FLAG_DATA,
    FLAG_HEADER,
    FLAG_SEALED,
    MAX_RO_INDEX_SIZE,
    SLOT_SIZE,
    LsmtHeader,
)
from obdfuse.layers.index import SegmentIndex
from obdfuse.layers.segment import ENTRY_SIZE, SECTOR, Segments, decode
from obdfuse.tarwrap import unwrap_tar
from obdfuse.zfile import ZFileReader, is_zfile

DATA_START_SECTOR = SLOT_SIZE // SECTOR  # 8: data never starts before the header ends


@dataclass
class SealedLayer:
    """A read-only LSMT layer: its header/trailer, its index (tag 0) and its data blob."""

    blob: Blob  # the LSMT file view (after tar/ZFile unwrapping)
    header: LsmtHeader
    trailer: LsmtHeader
    index: SegmentIndex
    wrapping: list[str] = field(default_factory=list)  # outer first: "tar", "zfile"
    outer: Blob | None = None  # the blob as given (for closing)

    @property
    def name(self) -> str:
        return self.blob.name

    @property
    def virtual_size(self) -> int:
        return self.trailer.virtual_size

    @property
    def uuid(self) -> str:
        return self.trailer.uuid

    @property
    def parent_uuid(self) -> str:
        return self.trailer.parent_uuid

    @property
    def segments(self) -> Segments:
        return self.index.segs

    async def read_sectors(self, moffset: int, count: int) -> bytes:
        """Read `count` sectors of layer data at sector `moffset` (exactly, or raise)."""
        want = count * SECTOR
        data = await self.blob.pread(moffset * SECTOR, want)
        if len(data) != want:
            raise FormatError(
                f"{self.name}: short read of layer data at byte {moffset * SECTOR} "
                f"({len(data)} of {want} bytes)"
            )
        return data

    def commit_segments(self) -> Segments:
        """The index as a commit source (overlaybd-commit --commit_sealed)."""
        return self.index.segs

    async def read_tagged(self, tag: int, moffset: int, count: int) -> bytes:
        return await self.read_sectors(moffset, count)

    async def aclose(self) -> None:
        await (self.outer or self.blob).aclose()


async def open_layer(blob: Blob) -> SealedLayer:
    """Open a layer blob: [tar wrapper] → [ZFile] → sealed LSMT (§4.2)."""
    wrapping: list[str] = []
    view = await unwrap_tar(blob)
    if view is not blob:
        wrapping.append("tar")
    if is_zfile(await view.pread(0, 512)):
        view = await ZFileReader.open(view, unwrap=False)
        wrapping.append("zfile")
    layer = await open_sealed(view)
    layer.wrapping = wrapping
    layer.outer = blob
    return layer


async def open_sealed(blob: Blob) -> SealedLayer:
    """Read and validate a sealed LSMT file (trailer-based, §3.4)."""
    name = blob.name
    size = blob.size
    if size < 2 * SLOT_SIZE:
        raise FormatError(f"{name}: {size} bytes is too small for an LSMT layer")
    header = LsmtHeader.unpack(await blob.pread(0, SLOT_SIZE), f"{name}: header at 0")
    if not (header.flags & FLAG_HEADER and header.flags & FLAG_DATA):
        raise FormatError(f"{name}: header flags {header.flags:#x} are not a data-file header")
    trailer_off = size - SLOT_SIZE
    trailer = LsmtHeader.unpack(
        await blob.pread(trailer_off, SLOT_SIZE), f"{name}: trailer at {trailer_off}"
    )
    sealed = trailer.flags & FLAG_DATA and trailer.flags & FLAG_SEALED
    if trailer.flags & FLAG_HEADER or not sealed:
        raise FormatError(
            f"{name}: trailer flags {trailer.flags:#x} do not mark a sealed layer "
            "(is this a writable layer? commit it first)"
        )
    n = trailer.index_size
    ioff = trailer.index_offset
    if n > MAX_RO_INDEX_SIZE:
        raise FormatError(f"{name}: index of {n} entries exceeds the limit {MAX_RO_INDEX_SIZE}")
    if ioff % SECTOR or ioff < SLOT_SIZE or ioff > trailer_off:
        raise FormatError(f"{name}: index offset {ioff} is outside the data area")
    if n * ENTRY_SIZE > trailer_off - ioff:
        raise FormatError(
            f"{name}: index of {n} entries at {ioff} overruns the trailer at {trailer_off}"
        )
    raw = await blob.pread(ioff, n * ENTRY_SIZE)
    if len(raw) != n * ENTRY_SIZE:
        raise FormatError(f"{name}: index at {ioff} is truncated")
    segs = decode(raw).with_tag(0)
    validate_sealed_index(
        segs, data_end_sector=ioff // SECTOR, virtual_size=trailer.virtual_size, where=name
    )
    return SealedLayer(blob, header, trailer, SegmentIndex(segs, check=False))


def validate_sealed_index(
    segs: Segments, *, data_end_sector: int, virtual_size: int, where: str
) -> None:
    """Reject hostile indexes: zero lengths, disorder/overlap, data outside the file or disk."""
    if not len(segs):
        return

    def fail(mask: np.ndarray, why: str) -> None:
        i = int(np.argmax(mask))
        raise FormatError(
            f"{where}: index entry #{i} (offset {int(segs.offset[i]) * SECTOR}, "
            f"length {int(segs.length[i]) * SECTOR} bytes): {why}"
        )

    bad = segs.length <= 0
    if bad.any():
        fail(bad, "has length 0")
    bad = np.zeros(len(segs), dtype=bool)
    bad[1:] = segs.end[:-1] > segs.offset[1:]
    if bad.any():
        fail(bad, "is unsorted or overlaps the previous entry")
    bad = segs.moffset < DATA_START_SECTOR
    if bad.any():
        fail(bad, "points into the header")
    bad = segs.mend > data_end_sector
    if bad.any():
        fail(bad, f"points past the data area (ends at sector {data_end_sector})")
    bad = segs.end * SECTOR > virtual_size
    if bad.any():
        fail(bad, f"ends past the virtual size {virtual_size}")
