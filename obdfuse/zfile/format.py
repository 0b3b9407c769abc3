"""The ZFile container format as pure functions on bytes (spec §2).

Owns: the constants of the format, the 512-byte header/trailer slot (decode,
encode, digest), flag bits, the index (jump table) with its CRC, and the bounds
checks that make hostile input fail before anything is allocated from it.
Must not: do IO, compress, or know about tar, layers or FUSE.
"""

from __future__ import annotations

import struct
from array import array
from dataclasses import dataclass, replace

import numpy as np

from obdfuse.crc import crc_raw
from obdfuse.errors import CorruptDataError, FormatError
from obdfuse.slotflags import FLAG_DATA, FLAG_HEADER, FLAG_SEALED, SlotFlags

# --- constants (spec §2.2, §2.3, §2.5, §2.6, §2.8) -------------------------------------------

MAGIC0 = b"ZFile\x00\x01\x00"  # §2.2 offset 0
MAGIC1 = b"tuji.yyf@Alibaba"  # §2.2 offset 8 (photon UUID serialised little-endian)
MAGIC = MAGIC0 + MAGIC1
SLOT_SIZE = 512  # §2.1 header and trailer occupy 512-byte slots
STRUCT_SIZE = 96  # §2.2 `size` field: meaningful bytes of the slot
DIGEST_OFFSET = 28  # §2.2 the digest field, zeroed while computing the digest

# §2.3 bits 0-2 (header / data file, always set for ZFile / sealed) are shared with LSMT
FLAG_HEADER_OVERWRITE = 1 << 3  # §2.3 bit 3: header carries the trailer's index info
FLAG_DIGEST = 1 << 4  # §2.3 bit 4: digest and index_crc are valid
FLAG_INDEX_COMPRESSED = 1 << 5  # §2.3 bit 5: defined upstream, never set or honoured

FLAGS_INITIAL_HEADER = FLAG_HEADER | FLAG_DATA | FLAG_DIGEST  # 0x13
FLAGS_TRAILER = FLAG_DATA | FLAG_SEALED | FLAG_DIGEST  # 0x16
FLAGS_OVERWRITTEN_HEADER = FLAG_HEADER | FLAG_DATA | FLAG_HEADER_OVERWRITE | FLAG_DIGEST  # 0x1B

ALGO_LZ4 = 1  # §2.2 `algo`
ALGO_ZSTD = 2
ALGORITHMS = {"lz4": ALGO_LZ4, "zstd": ALGO_ZSTD}
ALGORITHM_NAMES = {v: k for k, v in ALGORITHMS.items()}
ZSTD_LEVEL = 3  # §2.4 upstream compresses ZSTD at level 3 whatever `level` says

CHECKSUM_SIZE = 4  # §2.4 LE u32 crc_salt after each block when verify = 1
INDEX_ENTRY_SIZE = 4  # §2.5 LE u32 stored length per block
MAX_INDEX_SIZE = 1_000_000_000  # §2.5 MAX_ZFILE_INDEX_SIZE
MAX_BLOCK_SIZE = 65536  # §2.6 reader limit (MAX_READ_SIZE)
UPSTREAM_MAX_STORED_BLOCK = 65536  # §2.6 a stored block must fit the reader's 64 KiB buffer
DEFAULT_BLOCK_SIZE = 4096  # §2.8
WRITER_BLOCK_SIZES = (4096, 8192, 16384, 32768, 65536)  # §2.8 tools: --bs 4..64 (KiB)

_SLOT = struct.Struct("<8s16sIIQQQQIIIBBBBIIB")  # the 89 bytes up to and including `verify`


def stored_block_bound(block_size: int) -> int:
    """Largest stored length (with checksum) any supported codec can produce for a block.

    Covers LZ4 (`n + n/255 + 16`) and zstd (`n + n/256 + 64` for small inputs) with margin.
    """
    return block_size + (block_size >> 7) + 128 + CHECKSUM_SIZE


# --- header / trailer slot -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class HeaderTrailer(SlotFlags):
    """One decoded 512-byte header or trailer slot (spec §2.2)."""

    flags: int
    index_offset: int = 0
    index_size: int = 0
    original_file_size: int = 0
    index_crc: int = 0
    block_size: int = DEFAULT_BLOCK_SIZE
    algorithm: int = ALGO_LZ4
    level: int = 0
    use_dict: int = 0
    dict_size: int = 0
    verify: bool = True
    digest: int = 0
    struct_size: int = STRUCT_SIZE

    @property
    def header_overwritten(self) -> bool:
        return bool(self.flags & FLAG_HEADER_OVERWRITE)

    @property
    def has_digest(self) -> bool:
        return bool(self.flags & FLAG_DIGEST)

    @property
    def algorithm_name(self) -> str:
        return ALGORITHM_NAMES.get(self.algorithm, f"unknown({self.algorithm})")

    def with_flags(self, flags: int) -> HeaderTrailer:
        """A copy with other flags (e.g. the trailer turned into an overwritten header)."""
        return replace(self, flags=flags)


def has_magic(slot: bytes | memoryview) -> bool:
    """True if `slot` starts with both ZFile magics."""
    return len(slot) >= len(MAGIC) and bytes(slot[: len(MAGIC)]) == MAGIC


def is_zfile(first_512: bytes) -> bool:
    """True if these bytes start a ZFile: both magics and the header bit (spec §2.7).

    A header whose digest is wrong still counts as a ZFile; opening it then fails loudly
    instead of the bytes being passed through as raw data.
    """
    if len(first_512) < SLOT_SIZE or not has_magic(first_512):
        return False
    (flags,) = struct.unpack_from("<Q", first_512, 32)
    return bool(flags & FLAG_HEADER)


def decode_slot(slot: bytes | memoryview, *, where: str = "ZFile slot") -> HeaderTrailer:
    """Decode a 512-byte header/trailer slot. Checks the magics only (see `check_digest`)."""
    if len(slot) < SLOT_SIZE:
        raise FormatError(f"{where}: {len(slot)} bytes, a ZFile slot needs {SLOT_SIZE}")
    if not has_magic(slot):
        raise FormatError(f"{where}: not a ZFile (magic mismatch)")
    (
        _m0,
        _m1,
        struct_size,
        digest,
        flags,
        index_offset,
        index_size,
        original_file_size,
        index_crc,
        _reserved0,
        block_size,
        algorithm,
        level,
        use_dict,
        _pad,
        _reserved1,
        dict_size,
        verify,
    ) = _SLOT.unpack_from(slot, 0)
    return HeaderTrailer(
        flags=flags,
        index_offset=index_offset,
        index_size=index_size,
        original_file_size=original_file_size,
        index_crc=index_crc,
        block_size=block_size,
        algorithm=algorithm,
        level=level,
        use_dict=use_dict,
        dict_size=dict_size,
        verify=verify != 0,
        digest=digest,
        struct_size=struct_size,
    )


def slot_digest(slot: bytes | memoryview) -> int:
    """`crc_raw` of the 512-byte slot with its digest field zeroed (spec §2.2)."""
    buf = bytearray(slot[:SLOT_SIZE])
    buf[DIGEST_OFFSET : DIGEST_OFFSET + 4] = b"\0\0\0\0"
    return crc_raw(buf)


def check_digest(slot: bytes | memoryview, ht: HeaderTrailer, *, where: str) -> None:
    """Raise CorruptDataError if the slot claims a digest (bit 4) and it does not match."""
    if not ht.has_digest:
        return
    actual = slot_digest(slot)
    if actual != ht.digest:
        raise CorruptDataError(
            f"{where}: digest mismatch (stored 0x{ht.digest:08x}, computed 0x{actual:08x})"
        )


def encode_slot(ht: HeaderTrailer) -> bytes:
    """Encode a slot as current writers do: zero-filled, digest computed when bit 4 is set."""
    buf = bytearray(SLOT_SIZE)
    _SLOT.pack_into(
        buf,
        0,
        MAGIC0,
        MAGIC1,
        ht.struct_size,
        0,
        ht.flags,
        ht.index_offset,
        ht.index_size,
        ht.original_file_size,
        ht.index_crc,
        0,
        ht.block_size,
        ht.algorithm,
        ht.level,
        ht.use_dict,
        0,
        0,
        ht.dict_size,
        1 if ht.verify else 0,
    )
    if ht.flags & FLAG_DIGEST:
        struct.pack_into("<I", buf, DIGEST_OFFSET, crc_raw(buf))
    return bytes(buf)


# --- validation of the slot that describes the file ------------------------------------------


def check_geometry(ht: HeaderTrailer, *, data_end: int, where: str) -> None:
    """Check the fields that size later reads and allocations, before any of them happen.

    `data_end` is where the index may end at the latest: the file size minus the trailer.
    """
    bs = ht.block_size
    if bs == 0 or bs & (bs - 1) or bs > MAX_BLOCK_SIZE:
        raise FormatError(f"{where}: block_size {bs} is not a power of two up to {MAX_BLOCK_SIZE}")
    if ht.algorithm not in ALGORITHM_NAMES:
        raise FormatError(f"{where}: unsupported compression algorithm {ht.algorithm}")
    if ht.index_size > MAX_INDEX_SIZE:
        raise FormatError(f"{where}: index_size {ht.index_size} exceeds the limit {MAX_INDEX_SIZE}")
    base = SLOT_SIZE + ht.dict_size
    if ht.index_offset < base:
        raise FormatError(
            f"{where}: index_offset {ht.index_offset} lies before the first block at {base}"
        )
    index_end = ht.index_offset + INDEX_ENTRY_SIZE * ht.index_size
    if index_end > data_end:
        raise FormatError(
            f"{where}: index at offset {ht.index_offset} ({ht.index_size} entries, ending at "
            f"{index_end}) lies outside the file (data ends at {data_end}; truncated?)"
        )
    expected_blocks = -(-ht.original_file_size // bs)
    if expected_blocks != ht.index_size:
        raise FormatError(
            f"{where}: original_file_size {ht.original_file_size} needs {expected_blocks} "
            f"blocks of {bs} bytes but the index has {ht.index_size}"
        )


# --- index (jump table) ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class JumpTable:
    """Absolute offsets of the stored blocks: block i is `offsets[i]:offsets[i+1]`.

    `offsets` is an array('Q') (n_blocks + 1 entries) so that the hot path indexes it
    with plain Python ints and no per-call object churn.
    """

    offsets: array
    max_stored: int

    @property
    def n_blocks(self) -> int:
        return len(self.offsets) - 1


def index_crc(index: bytes | memoryview) -> int:
    """`crc_raw` over the index bytes as stored (spec §2.5)."""
    return crc_raw(index)


def encode_index(stored_sizes: array | list[int]) -> bytes:
    """The on-disk index: one LE u32 stored length per block."""
    return np.asarray(stored_sizes, dtype="<u4").tobytes()


def build_jump_table(
    index: bytes | memoryview, ht: HeaderTrailer, *, where: str, check_crc: bool | None = None
) -> JumpTable:
    """Validate the index bytes against `ht` and turn them into block offsets.

    Every entry must be > 4 with checksums (> 0 without) and no larger than the codec's
    bound for one block; the blocks must end at or before the index. The index CRC is
    checked when the slot's digest bit is set (or when `check_crc` forces it).
    """
    n = ht.index_size
    if len(index) != INDEX_ENTRY_SIZE * n:
        raise FormatError(f"{where}: index is {len(index)} bytes, expected {INDEX_ENTRY_SIZE * n}")
    if check_crc is None:
        check_crc = ht.has_digest
    if check_crc:
        actual = index_crc(index)
        if actual != ht.index_crc:
            raise CorruptDataError(
                f"{where}: index at offset {ht.index_offset} fails its CRC "
                f"(stored 0x{ht.index_crc:08x}, computed 0x{actual:08x})"
            )
    sizes = np.frombuffer(index, dtype="<u4")
    base = SLOT_SIZE + ht.dict_size
    offsets = np.empty(n + 1, dtype=np.uint64)
    offsets[0] = base
    max_stored = 0
    if n:
        smallest = CHECKSUM_SIZE + 1 if ht.verify else 1
        bound = stored_block_bound(ht.block_size)
        low = int(sizes.min())
        high = int(sizes.max())
        if low < smallest:
            bad = int(np.argmax(sizes < smallest))
            raise FormatError(
                f"{where}: index entry {bad} (at offset {ht.index_offset + 4 * bad}) gives "
                f"block {bad} a stored length of {int(sizes[bad])} bytes (minimum {smallest})"
            )
        if high > bound:
            bad = int(np.argmax(sizes > bound))
            raise FormatError(
                f"{where}: index entry {bad} (at offset {ht.index_offset + 4 * bad}) gives "
                f"block {bad} a stored length of {int(sizes[bad])} bytes, more than any "
                f"{ht.block_size}-byte block can take ({bound})"
            )
        np.cumsum(sizes, dtype=np.uint64, out=offsets[1:])
        offsets[1:] += np.uint64(base)
        max_stored = high
    end = int(offsets[-1])
    if end > ht.index_offset:
        raise FormatError(
            f"{where}: the index places blocks up to offset {end}, past the index itself at "
            f"{ht.index_offset}"
        )
    table = array("Q")
    table.frombytes(offsets.astype("=u8", copy=False).tobytes())
    return JumpTable(offsets=table, max_stored=max_stored)
