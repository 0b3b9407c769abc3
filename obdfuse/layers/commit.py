"""Commit (compaction) of a layer into a sealed LSMT file, like `overlaybd-commit` (spec §3.6).

`plan_commit` is the pure part (new index from a flat index); `write_lsmt`
streams header, data, padded index and trailer to any writer; `commit_layer`
adds the optional ZFile compression and tar wrapping around it.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Awaitable, Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol

import numpy as np

from obdfuse.errors import FormatError
from obdfuse.fileio import atomic_output
from obdfuse.layers.header import (
    COMMIT_HEADER_FLAGS,
    COMMIT_TRAILER_FLAGS,
    NULL_UUID,
    SLOT_SIZE,
    USER_TAG_SIZE,
    LsmtHeader,
    normalize_uuid,
)
from obdfuse.layers.segment import (
    INVALID_ENTRY,
    SECTOR,
    Segments,
    check_fields,
    encode,
    merge_adjacent,
    pad_to,
    split_pieces,
)

COPY_PIECE = 64  # sectors: commit copies data in 32 KiB pieces per mapping (§3.6)
FIRST_DATA_SECTOR = SLOT_SIZE // SECTOR
READ_CHUNK = 4 << 20

ReadSectors = Callable[[int, int, int], Awaitable[bytes]]  # (tag, moffset, count) -> bytes


class CommitSource(Protocol):
    """What a commit needs from a layer (writable, sealed, or a whole stack)."""

    virtual_size: int
    uuid: str
    parent_uuid: str

    def commit_segments(self) -> Segments: ...

    async def read_tagged(self, tag: int, moffset: int, count: int) -> bytes: ...


@dataclass(frozen=True)
class CommitOptions:
    """`overlaybd-commit` options: identity of the new layer and its wrapping."""

    uuid: str | None = None  # None → the null UUID, as overlaybd-commit does
    parent_uuid: str | None = None  # None → the source's parent
    user_tag: bytes = b""  # commit message (-m), ≤ 256 bytes
    zfile: bool = False
    algorithm: str = "lz4"
    block_size: int = 4096
    tar: bool = False
    overwrite_header: bool = True  # ZFile header 0x1B (commit -z); overlaybd-merge leaves 0x13


def plan_commit(flat: Segments) -> tuple[Segments, int]:
    """The committed index (before padding) and the end of data, in sectors (§3.6)."""
    pieces = split_pieces(flat, COPY_PIECE, split_zeroed=False)
    data_len = np.where(pieces.zeroed, 0, pieces.length)
    ends = np.cumsum(data_len)
    moff = FIRST_DATA_SECTOR + ends - data_len
    placed = Segments(pieces.offset, pieces.length, moff, pieces.zeroed, pieces.tag)
    data_end = FIRST_DATA_SECTOR + (int(ends[-1]) if len(ends) else 0)
    return merge_adjacent(placed), data_end


async def write_lsmt(
    flat: Segments,
    read: ReadSectors,
    out: BinaryIO,
    *,
    virtual_size: int,
    uuid: str,
    parent_uuid: str,
    user_tag: bytes = b"",
) -> int:
    """Write a committed LSMT file for a flat, sorted index; returns its size in bytes.

    `read(tag, moffset, count)` returns the data of source `tag`. Entries of the
    output carry the input tags (0 for a single layer; levels for a merge).
    """
    if len(user_tag) > USER_TAG_SIZE:
        raise ValueError(f"commit message longer than {USER_TAG_SIZE} bytes")
    index, data_end = plan_commit(flat)
    check_fields(index, "commit")  # an out-of-range field would encode into a corrupt entry
    header = LsmtHeader(
        flags=COMMIT_HEADER_FLAGS,
        virtual_size=virtual_size,
        uuid=normalize_uuid(uuid),
        parent_uuid=normalize_uuid(parent_uuid),
        user_tag=user_tag,
    )
    out.write(header.pack())
    await _copy_data(flat, read, out)
    padding = pad_to(len(index))
    encoded = encode(index) + INVALID_ENTRY * padding
    for pos in range(0, len(encoded), 4096):
        out.write(encoded[pos : pos + 4096])
    trailer = header.replace(
        flags=COMMIT_TRAILER_FLAGS,
        index_offset=data_end * SECTOR,
        index_size=len(index) + padding,
    )
    out.write(trailer.pack())
    return data_end * SECTOR + len(encoded) + SLOT_SIZE


async def _copy_data(flat: Segments, read: ReadSectors, out: BinaryIO) -> int:
    """Copy the data of every non-zeroed mapping in logical order, coalescing reads.

    Every read must return exactly the sectors asked for: one short read would shift
    all later data against the index, so it fails the commit instead.
    """
    data = flat.take(~flat.zeroed)
    n = len(data)
    if not n:
        return 0
    # Runs of mappings whose source data is contiguous in the same source.
    breaks = np.ones(n, dtype=bool)
    breaks[1:] = (data.mend[:-1] != data.moffset[1:]) | (data.tag[:-1] != data.tag[1:])
    heads = np.flatnonzero(breaks)
    csum = np.concatenate(([0], np.cumsum(data.length)))
    tails = np.concatenate((heads[1:], [n]))
    total = 0
    chunk = READ_CHUNK // SECTOR
    for h, t in zip(heads.tolist(), tails.tolist(), strict=True):
        tag, start = int(data.tag[h]), int(data.moffset[h])
        count = int(csum[t] - csum[h])
        for pos in range(0, count, chunk):
            n_sec = min(chunk, count - pos)
            buf = await read(tag, start + pos, n_sec)
            if len(buf) != n_sec * SECTOR:
                raise FormatError(
                    f"commit: source {tag} returned {len(buf)} of {n_sec * SECTOR} bytes "
                    f"at byte {(start + pos) * SECTOR}"
                )
            out.write(buf)
            total += len(buf)
    return total


async def commit_layer(
    source: CommitSource, out_path: str | os.PathLike[str], options: CommitOptions = CommitOptions()
) -> int:
    """Commit `source` into a new sealed layer file at `out_path`; returns its size.

    The output is written to a temporary file beside `out_path` and renamed into
    place once complete and synced, so a failed commit never leaves a partial layer.
    """
    out_path = Path(out_path)
    uuid = normalize_uuid(options.uuid) if options.uuid else NULL_UUID
    parent = normalize_uuid(options.parent_uuid) if options.parent_uuid else source.parent_uuid
    with atomic_output(out_path) as f, ExitStack() as scratch:
        # A tar wrapper needs the payload size first: stage the payload in a temp file.
        target: BinaryIO = (
            scratch.enter_context(tempfile.TemporaryFile(dir=out_path.parent))
            if options.tar
            else f
        )
        writer = None
        if options.zfile:
            from obdfuse.zfile import ZFileWriter

            writer = scratch.enter_context(  # aborted (threads stopped) if the commit fails
                ZFileWriter(
                    target,
                    algorithm=options.algorithm,
                    block_size=options.block_size,
                    checksum=True,
                    overwrite_header=options.overwrite_header,
                )
            )
        await write_lsmt(
            source.commit_segments(),
            source.read_tagged,
            writer if writer is not None else target,  # type: ignore[arg-type]
            virtual_size=source.virtual_size,
            uuid=uuid,
            parent_uuid=parent,
            user_tag=options.user_tag,
        )
        if writer is not None:
            writer.close()
        if options.tar:
            from obdfuse.tarwrap import write_wrapped

            payload_size = target.seek(0, os.SEEK_END)
            target.seek(0)
            write_wrapped(target, f, payload_size)
        return f.seek(0, os.SEEK_END)
