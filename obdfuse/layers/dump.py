"""Write the merged virtual disk of a Stack as a sparse raw file.

Only mapped extents are read; all-zero sectors inside them are skipped, so
holes stay holes and a 64 GiB image with little data dumps in seconds.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from obdfuse.errors import FormatError
from obdfuse.fileio import atomic_output, pwrite_all
from obdfuse.layers.segment import SECTOR
from obdfuse.layers.stack import Stack

CHUNK = 4 << 20


def data_extents(stack: Stack) -> tuple[np.ndarray, np.ndarray]:
    """Byte [start, end) arrays of the disk's data extents (adjacent mappings fused)."""
    segs = stack.flat_index().segs
    data = segs.take(~segs.zeroed)
    if not len(data):
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty
    ends = data.end
    new = np.ones(len(data), dtype=bool)
    new[1:] = data.offset[1:] != ends[:-1]
    heads = np.flatnonzero(new)
    tails = np.concatenate((heads[1:], [len(data)])) - 1
    return data.offset[heads] * SECTOR, ends[tails] * SECTOR


async def dump_image(stack: Stack, out: str | os.PathLike[str]) -> int:
    """Write `stack` to `out` (a sparse file of stack.size bytes); returns bytes written.

    The disk is assembled in a temporary file beside `out` and renamed over it once
    complete and synced: a failed dump (a corrupt layer, a full disk) leaves no
    partial image behind and an existing `out` untouched.
    """
    out = Path(out)
    if out.exists() and not out.is_file():
        raise FormatError(f"{out}: exists and is not a regular file; dump writes a sparse file")
    written = 0
    with atomic_output(out) as f:
        fd = f.fileno()
        starts, ends = data_extents(stack)
        for start, end in zip(starts.tolist(), ends.tolist(), strict=True):
            for pos in range(start, end, CHUNK):
                n = min(CHUNK, end - pos)
                data = await stack.pread(pos, n)
                written += _write_nonzero(fd, data, pos)
        os.ftruncate(fd, stack.size)
    return written


def _write_nonzero(fd: int, data: bytes, offset: int) -> int:
    """pwrite the runs of non-zero sectors of `data` (sector-aligned) at `offset`."""
    sectors = np.frombuffer(data, dtype="<u8").reshape(-1, SECTOR // 8).any(axis=1)
    if not sectors.any():
        return 0
    if sectors.all():
        pwrite_all(fd, data, offset)
        return len(data)
    edges = np.diff(np.concatenate(([False], sectors, [False])).astype(np.int8))
    run_starts = np.flatnonzero(edges == 1)
    run_ends = np.flatnonzero(edges == -1)
    view = memoryview(data)
    total = 0
    for a, b in zip(run_starts.tolist(), run_ends.tolist(), strict=True):
        pwrite_all(fd, view[a * SECTOR : b * SECTOR], offset + a * SECTOR)
        total += (b - a) * SECTOR
    return total
