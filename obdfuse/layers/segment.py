"""The 16-byte LSMT SegmentMapping codec and the commit merge rule (spec §3.3, §3.6).

Sans-IO and vectorised: a whole index decodes into parallel numpy arrays
(`Segments`), all in 512-byte sectors. No IO, no knowledge of layers or files.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SECTOR = 512
ENTRY_SIZE = 16
MAX_LENGTH = (1 << 14) - 1  # 16383 sectors per mapping (§3.3)
INVALID_OFFSET = (1 << 50) - 1  # offset of padding / invalid entries (§3.3)
MAX_OFFSET = INVALID_OFFSET  # exclusive upper bound of a valid logical sector
MAX_MOFFSET = (1 << 55) - 1
INVALID_ENTRY = (INVALID_OFFSET).to_bytes(8, "little") + bytes(8)

_OFFSET_MASK = np.uint64(INVALID_OFFSET)
_MOFFSET_MASK = np.uint64(MAX_MOFFSET)
_RAW = np.dtype([("lo", "<u8"), ("hi", "<u8")])


@dataclass(frozen=True, slots=True)
class Segments:
    """Parallel arrays of mappings, in sectors: [offset, offset+length) → moffset.

    `tag` is the on-disk tag when decoded; inside an index it names the layer
    (or other source) the data comes from.
    """

    offset: np.ndarray  # int64
    length: np.ndarray  # int64
    moffset: np.ndarray  # int64
    zeroed: np.ndarray  # bool
    tag: np.ndarray  # uint8

    def __len__(self) -> int:
        return len(self.offset)

    @property
    def end(self) -> np.ndarray:
        return self.offset + self.length

    @property
    def mend(self) -> np.ndarray:
        """End of the referenced data (moffset for zeroed mappings)."""
        return self.moffset + np.where(self.zeroed, 0, self.length)

    def take(self, which) -> Segments:
        """The mappings selected by an index array, slice or boolean mask."""
        return Segments(
            self.offset[which],
            self.length[which],
            self.moffset[which],
            self.zeroed[which],
            self.tag[which],
        )

    def with_tag(self, tag: int) -> Segments:
        """A copy whose every tag is `tag`."""
        return Segments(
            self.offset,
            self.length,
            self.moffset,
            self.zeroed,
            np.full(len(self), tag, dtype=np.uint8),
        )


def make_segments(offset, length, moffset, zeroed=None, tag=None) -> Segments:
    """Build Segments from array-likes (zeroed defaults to False, tag to 0)."""
    offset = np.asarray(offset, dtype=np.int64)
    n = len(offset)
    return Segments(
        offset,
        np.asarray(length, dtype=np.int64),
        np.asarray(moffset, dtype=np.int64),
        np.zeros(n, dtype=bool) if zeroed is None else np.asarray(zeroed, dtype=bool),
        np.zeros(n, dtype=np.uint8) if tag is None else np.asarray(tag, dtype=np.uint8),
    )


def empty_segments() -> Segments:
    """Segments with no mappings."""
    return make_segments([], [], [])


def concat(parts: list[Segments]) -> Segments:
    """Concatenate several Segments in order."""
    if not parts:
        return empty_segments()
    return Segments(
        np.concatenate([p.offset for p in parts]),
        np.concatenate([p.length for p in parts]),
        np.concatenate([p.moffset for p in parts]),
        np.concatenate([p.zeroed for p in parts]),
        np.concatenate([p.tag for p in parts]),
    )


def decode(buf: bytes | memoryview, *, keep_invalid: bool = False) -> Segments:
    """Decode a packed array of 16-byte mappings; invalid (padding) entries are dropped."""
    if len(buf) % ENTRY_SIZE:
        raise ValueError(f"index of {len(buf)} bytes is not a multiple of {ENTRY_SIZE}")
    raw = np.frombuffer(buf, dtype=_RAW)
    lo, hi = raw["lo"], raw["hi"]
    offset = lo & _OFFSET_MASK
    if not keep_invalid:
        valid = offset != _OFFSET_MASK
        if not valid.all():
            lo, hi, offset = lo[valid], hi[valid], offset[valid]
    return Segments(
        offset.astype(np.int64),
        (lo >> np.uint64(50)).astype(np.int64),
        (hi & _MOFFSET_MASK).astype(np.int64),
        ((hi >> np.uint64(55)) & np.uint64(1)).astype(bool),
        (hi >> np.uint64(56)).astype(np.uint8),
    )


def encode(segs: Segments) -> bytes:
    """Pack mappings into 16-byte entries (fields must already be in range)."""
    raw = np.empty(len(segs), dtype=_RAW)
    raw["lo"] = segs.offset.astype(np.uint64) | (segs.length.astype(np.uint64) << np.uint64(50))
    raw["hi"] = (
        segs.moffset.astype(np.uint64)
        | (segs.zeroed.astype(np.uint64) << np.uint64(55))
        | (segs.tag.astype(np.uint64) << np.uint64(56))
    )
    return raw.tobytes()


def pad_to(n_entries: int, multiple: int = 256) -> int:
    """Number of invalid entries that pad `n_entries` to a multiple (§3.4)."""
    return -n_entries % multiple


def check_fields(segs: Segments, where: str) -> None:
    """Reject mappings whose fields cannot be encoded or make no sense (length 0)."""
    if not len(segs):
        return
    bad = (
        (segs.length <= 0)
        | (segs.length > MAX_LENGTH)
        | (segs.offset < 0)
        | (segs.end > MAX_OFFSET)
        | (segs.moffset < 0)
        | (segs.moffset > MAX_MOFFSET)
    )
    if bad.any():
        i = int(np.argmax(bad))
        raise ValueError(
            f"{where}: mapping #{i} (offset {int(segs.offset[i])}, length "
            f"{int(segs.length[i])}, moffset {int(segs.moffset[i])} sectors) is out of range"
        )


def split_pieces(segs: Segments, piece: int, *, split_zeroed: bool) -> Segments:
    """Cut each mapping into pieces of `piece` sectors counted from its own start (§3.6).

    Zeroed mappings are left whole unless `split_zeroed`.
    """
    n = len(segs)
    if not n:
        return segs
    counts = -(-segs.length // piece)
    if not split_zeroed:
        counts = np.where(segs.zeroed, 1, counts)
    total = int(counts.sum())
    if total == n:
        return segs
    owner = np.repeat(np.arange(n), counts)
    first = np.cumsum(counts) - counts
    k = np.arange(total) - first[owner]  # piece number inside its mapping
    skip = k * piece
    length = np.minimum(segs.length[owner] - skip, piece)
    whole = ~split_zeroed & segs.zeroed[owner]
    length = np.where(whole, segs.length[owner], length)
    zeroed = segs.zeroed[owner]
    return Segments(
        segs.offset[owner] + skip,
        length,
        segs.moffset[owner] + np.where(zeroed, 0, skip),
        zeroed,
        segs.tag[owner],
    )


def merge_adjacent(segs: Segments, limit: int = MAX_LENGTH) -> Segments:
    """Fuse neighbours greedily left to right, as overlaybd's commit does (§3.6).

    Two consecutive mappings fuse when logically and physically contiguous,
    with the same zeroed bit and tag, and the fused length stays strictly
    below `limit` (16383).
    """
    n = len(segs)
    if n < 2:
        return segs
    joinable = (
        (segs.end[:-1] == segs.offset[1:])
        & (segs.mend[:-1] == segs.moffset[1:])
        & (segs.zeroed[:-1] == segs.zeroed[1:])
        & (segs.tag[:-1] == segs.tag[1:])
    )
    if not joinable.any():
        return segs
    # Runs of joinable neighbours: run_start[i] marks the first entry of each run.
    starts_mask = np.concatenate(([True], ~joinable))
    run_starts = np.flatnonzero(starts_mask)
    run_ends = np.concatenate((run_starts[1:], [n]))
    keep_start = np.zeros(n, dtype=bool)
    csum = np.concatenate(([0], np.cumsum(segs.length)))
    multi = np.flatnonzero(run_ends - run_starts > 1)
    keep_start[run_starts] = True
    for r in multi.tolist():
        s, e = int(run_starts[r]), int(run_ends[r])
        # Greedy chunking: a chunk starting at s takes entries while its total < limit.
        # The first entry always belongs to the chunk, whatever its length.
        while s < e:
            keep_start[s] = True
            nxt = int(np.searchsorted(csum, csum[s] + limit, side="left")) - 1
            s = max(nxt, s + 1)
    heads = np.flatnonzero(keep_start)
    lengths = np.diff(np.concatenate((csum[heads], [csum[n]])))
    out = segs.take(heads)
    return Segments(out.offset, lengths, out.moffset, out.zeroed, out.tag)
