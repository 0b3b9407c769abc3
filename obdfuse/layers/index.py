"""Sorted, non-overlapping segment indexes in compact numpy arrays (spec §3.5, §3.8).

`SegmentIndex` is an immutable flat index with O(log n) range lookup.
`overlay` puts one index over another (top wins, zeroed top mappings shadow),
which is both how layers stack (§3.8) and how a write log resolves
(later wins, §3.5). `MutableSegmentIndex` takes single writes cheaply for a
writable layer. Everything is in 512-byte sectors; no IO here.
"""

from __future__ import annotations

import numpy as np

from obdfuse.layers.segment import Segments, concat, empty_segments

_BIG = np.int64(1 << 62)


class SegmentIndex:
    """An immutable index of sorted, non-overlapping mappings (sectors)."""

    __slots__ = ("_table", "end", "segs")

    def __init__(self, segs: Segments, *, check: bool = True) -> None:
        if check and len(segs) > 1 and (segs.end[:-1] > segs.offset[1:]).any():
            raise ValueError("segments are unsorted or overlap")
        self.segs = segs
        self.end = segs.end
        self._table: np.ndarray | None = None

    @property
    def table(self) -> np.ndarray:
        """Rows (offset, end, moffset, source) with source -1 for zeroed; built on first use.

        One slice + tolist() of this gives a lookup everything it needs.
        """
        if self._table is None:
            s = self.segs
            source = np.where(s.zeroed, -1, s.tag.astype(np.int64))
            self._table = np.column_stack((s.offset, self.end, s.moffset, source))
        return self._table

    def rows(self, start: int, end: int) -> list[list[int]]:
        """[offset, end, moffset, source] of the mappings overlapping [start, end), untrimmed."""
        i = int(self.end.searchsorted(start, side="right"))
        table = self.table
        k = 8
        rows = table[i : i + k].tolist()
        while len(rows) == k and rows[-1][0] < end:  # long reads: fetch more rows
            k *= 4
            rows = table[i : i + k].tolist()
        while rows and rows[-1][0] >= end:
            rows.pop()
        return rows

    @classmethod
    def empty(cls) -> SegmentIndex:
        """An index with no mappings."""
        return cls(empty_segments(), check=False)

    def __len__(self) -> int:
        return len(self.segs)

    def find(self, start: int, end: int) -> tuple[int, int]:
        """Slice [i, j) of the mappings that overlap sectors [start, end)."""
        i = int(np.searchsorted(self.end, start, side="right"))
        j = int(np.searchsorted(self.segs.offset, end, side="left"))
        return i, max(i, j)

    def clip(self, start: int, end: int) -> Segments:
        """The mappings overlapping [start, end), trimmed to it."""
        i, j = self.find(start, end)
        return trim(self.segs.take(slice(i, j)), start, end)

    def data_sectors(self) -> int:
        """Sectors that map to data (not zeroed)."""
        s = self.segs
        return int(s.length[~s.zeroed].sum())


def trim(segs: Segments, start: int, end: int) -> Segments:
    """Trim mappings to [start, end); moffsets of data mappings shift with the start."""
    if not len(segs):
        return segs
    off = np.maximum(segs.offset, start)
    new_end = np.minimum(segs.end, end)
    moff = segs.moffset + np.where(segs.zeroed, 0, off - segs.offset)
    return Segments(off, new_end - off, moff, segs.zeroed, segs.tag)


def sort_segments(segs: Segments) -> Segments:
    """`segs` ordered by logical offset (stable)."""
    order = np.argsort(segs.offset, kind="stable")
    return segs.take(order)


def fill_gaps(top: Segments, bottom: Segments) -> Segments:
    """The parts of `bottom` not covered by `top` (both sorted, non-overlapping)."""
    if not len(bottom) or not len(top):
        return bottom
    gap_start = np.concatenate(([np.int64(0)], top.end))
    gap_end = np.concatenate((top.offset, [_BIG]))
    nonempty = gap_end > gap_start
    gap_start, gap_end = gap_start[nonempty], gap_end[nonempty]
    b0, b1 = bottom.offset, bottom.end
    first = np.searchsorted(gap_end, b0, side="right")
    last = np.searchsorted(gap_start, b1, side="left")
    counts = np.maximum(last - first, 0)
    total = int(counts.sum())
    if total == 0:
        return empty_segments()
    owner = np.repeat(np.arange(len(bottom)), counts)
    gap = first[owner] + (np.arange(total) - (np.cumsum(counts) - counts)[owner])
    off = np.maximum(b0[owner], gap_start[gap])
    end = np.minimum(b1[owner], gap_end[gap])
    zeroed = bottom.zeroed[owner]
    moff = bottom.moffset[owner] + np.where(zeroed, 0, off - b0[owner])
    return Segments(off, end - off, moff, zeroed, bottom.tag[owner])


def overlay(top: Segments, bottom: Segments) -> Segments:
    """`top` over `bottom`: top mappings win, bottom fills the gaps; sorted result."""
    if not len(top):
        return bottom
    if not len(bottom):
        return top
    rest = fill_gaps(top, bottom)
    if not len(rest):
        return top
    return sort_segments(concat([top, rest]))


def merge_stack(layers_top_first: list[Segments]) -> SegmentIndex:
    """One flat index over several layers' indexes, top layer first (§3.8)."""
    if not layers_top_first:
        return SegmentIndex.empty()
    # Balanced folding keeps the work O(n log layers) instead of O(n * layers).
    parts = list(layers_top_first)
    while len(parts) > 1:
        nxt = [overlay(parts[k], parts[k + 1]) for k in range(0, len(parts) - 1, 2)]
        if len(parts) % 2:
            nxt.append(parts[-1])
        parts = nxt
    return SegmentIndex(parts[0], check=False)


_PAINT_CHUNK = 2048


def resolve_log(log: Segments) -> Segments:
    """Resolve an append log where later mappings override earlier ones (§3.5)."""
    n = len(log)
    if n == 0:
        return log
    chunks = [_paint(log.take(slice(k, k + _PAINT_CHUNK))) for k in range(0, n, _PAINT_CHUNK)]
    # Later chunks win: fold pairwise, keeping order (right = later = top).
    while len(chunks) > 1:
        nxt = [overlay(chunks[k + 1], chunks[k]) for k in range(0, len(chunks) - 1, 2)]
        if len(chunks) % 2:
            nxt.append(chunks[-1])
        chunks = nxt
    return chunks[0]


def _paint(log: Segments) -> Segments:
    """Resolve a short log by painting elementary intervals with the latest writer."""
    order = np.argsort(log.offset, kind="stable")
    srt = log.take(order)
    if len(srt) < 2 or not (srt.end[:-1] > srt.offset[1:]).any():
        return srt  # nothing overlaps
    bounds = np.unique(np.concatenate((log.offset, log.end)))
    lo = np.searchsorted(bounds, log.offset)
    hi = np.searchsorted(bounds, log.end)
    owner = np.full(len(bounds) - 1, -1, dtype=np.int64)
    for i, (a, b) in enumerate(zip(lo.tolist(), hi.tolist(), strict=True)):
        owner[a:b] = i
    used = np.flatnonzero(owner >= 0)
    who = owner[used]
    # Fuse consecutive elementary intervals with the same owner.
    new_run = np.ones(len(used), dtype=bool)
    new_run[1:] = (who[1:] != who[:-1]) | (used[1:] != used[:-1] + 1)
    heads = np.flatnonzero(new_run)
    tails = np.concatenate((heads[1:], [len(used)])) - 1
    w = who[heads]
    start = bounds[used[heads]]
    stop = bounds[used[tails] + 1]
    zeroed = log.zeroed[w]
    moff = log.moffset[w] + np.where(zeroed, 0, start - log.offset[w])
    return Segments(start, stop - start, moff, zeroed, log.tag[w])


def splice(index: SegmentIndex, offset: int, length: int, moffset: int, zeroed: bool) -> Segments:
    """`index` with one new mapping laid over it (tag 0): O(log n) search + one copy."""
    segs, ends = index.segs, index.end
    stop = offset + length
    i = int(ends.searchsorted(offset, side="right"))
    j = int(segs.offset.searchsorted(stop, side="left"))
    offs, lens, moffs, zers = [offset], [length], [moffset], [zeroed]
    if i < j:
        first_off = int(segs.offset[i])
        if first_off < offset:  # keep the head of the first overlapped mapping
            offs.insert(0, first_off)
            lens.insert(0, offset - first_off)
            moffs.insert(0, int(segs.moffset[i]))
            zers.insert(0, bool(segs.zeroed[i]))
        last_end = int(ends[j - 1])
        if last_end > stop:  # keep the tail of the last one
            z = bool(segs.zeroed[j - 1])
            shift = 0 if z else stop - int(segs.offset[j - 1])
            offs.append(stop)
            lens.append(last_end - stop)
            moffs.append(int(segs.moffset[j - 1]) + shift)
            zers.append(z)
    n = len(offs)
    return Segments(
        np.concatenate((segs.offset[:i], np.array(offs, dtype=np.int64), segs.offset[j:])),
        np.concatenate((segs.length[:i], np.array(lens, dtype=np.int64), segs.length[j:])),
        np.concatenate((segs.moffset[:i], np.array(moffs, dtype=np.int64), segs.moffset[j:])),
        np.concatenate((segs.zeroed[:i], np.array(zers, dtype=bool), segs.zeroed[j:])),
        np.concatenate((segs.tag[:i], np.zeros(n, dtype=np.uint8), segs.tag[j:])),
    )


class MutableSegmentIndex:
    """A writable layer's index: cheap single inserts, later wins.

    Recent writes collect in a small `pending` index that is folded into the
    large `base` index once it grows, so an insert costs O(pending), not O(n).
    """

    FOLD_AT = 4096

    def __init__(self, initial: Segments | None = None) -> None:
        self.base = SegmentIndex(initial if initial is not None else empty_segments())
        self.pending = SegmentIndex.empty()
        self.version = 0  # bumps on every change (lets readers cache a flat view)

    def insert(self, offset: int, length: int, moffset: int, zeroed: bool = False) -> None:
        """Map sectors [offset, offset+length); overrides what was there."""
        self.pending = SegmentIndex(
            splice(self.pending, offset, length, moffset, zeroed), check=False
        )
        self.version += 1
        if len(self.pending) >= self.FOLD_AT:
            self.fold()

    def fold(self) -> None:
        """Merge the pending writes into the base index."""
        if len(self.pending):
            self.base = SegmentIndex(overlay(self.pending.segs, self.base.segs), check=False)
            self.pending = SegmentIndex.empty()

    def flat(self) -> SegmentIndex:
        """The whole index as one flat SegmentIndex."""
        self.fold()
        return self.base

    def levels(self) -> list[SegmentIndex]:
        """Indexes to consult top-first for a lookup."""
        return [self.pending, self.base] if len(self.pending) else [self.base]
