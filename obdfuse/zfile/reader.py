"""Random-access reading of a ZFile over any Blob (spec §2.6, §4.3 for tar wrappers).

Owns: opening (tar unwrapping, header/trailer selection, digests, index CRC,
bounds), and `pread`, which fetches the stored bytes of the touched blocks with
one read of the inner Blob, checks each block's `crc_salt` and decompresses only
those blocks. Must not: know about LSMT, caches or FUSE.
"""

from __future__ import annotations

import struct
from collections.abc import AsyncIterator
from dataclasses import dataclass
from itertools import pairwise

from crc32c import crc32c as _std_crc32c

from obdfuse.blob import Blob, FileBlob
from obdfuse.crc import SALT_STD, STD_RESIDUE, crc_salt, salted_block_ok
from obdfuse.errors import CorruptDataError, FormatError
from obdfuse.tarwrap import HEAD_SIZE, payload_slice
from obdfuse.zfile.codec import DECOMPRESSORS, RAW_DECOMPRESSORS, CodecError
from obdfuse.zfile.format import (
    CHECKSUM_SIZE,
    INDEX_ENTRY_SIZE,
    SLOT_SIZE,
    HeaderTrailer,
    JumpTable,
    build_jump_table,
    check_digest,
    check_geometry,
    decode_slot,
    has_magic,
    is_zfile,
)

#: Bytes read from the end of a trailer-based file in one go: the trailer and, for
#: files up to ~16k blocks, the whole index (saves a round trip on remote blobs).
TAIL_PREFETCH = 64 * 1024 + SLOT_SIZE
#: Stored bytes checked per read by `verify_all`.
VERIFY_CHUNK = 4 << 20


@dataclass(frozen=True, slots=True)
class BadBlock:
    """A block that failed verification, for reports."""

    block: int
    offset: int
    stored_size: int
    reason: str


class ZFileReader:
    """A ZFile seen as the Blob of its uncompressed content."""

    def __init__(
        self,
        inner: Blob,
        ht: HeaderTrailer,
        table: JumpTable,
        *,
        verify: bool = True,
        name: str | None = None,
        blob_offset: int = 0,
        header: HeaderTrailer | None = None,
    ) -> None:
        self.name = name or inner.name
        self.inner = inner
        self.info = ht  # the slot that described the file (overwritten header or trailer)
        self.header = header or ht
        self.table = table
        self.verify = verify and ht.verify
        self.blob_offset = blob_offset  # where the ZFile starts in the outer blob (tar)
        self._size = ht.original_file_size
        self._bs = ht.block_size
        self._shift = ht.block_size.bit_length() - 1
        self._n = table.n_blocks
        self._offsets = table.offsets
        self._strip = CHECKSUM_SIZE if ht.verify else 0
        self._decompress = DECOMPRESSORS[ht.algorithm]
        self._raw_decompress = RAW_DECOMPRESSORS[ht.algorithm]
        self._tail = self._size - (self._n - 1) * self._bs if self._n else 0
        # (block number, bytes) of the last decoded block; one tuple so that concurrent
        # readers (threads) can never pair a block number with another block's bytes
        self._cached: tuple[int, bytes] = (-1, b"")
        # FileBlob offers a blocking pread for data that is on local disk (page cache)
        self._sync_pread = inner.pread_sync if isinstance(inner, FileBlob) else None

    # --- opening ---------------------------------------------------------------------------

    @classmethod
    async def open(cls, blob: Blob, *, verify: bool = True, unwrap: bool = True) -> ZFileReader:
        """Open `blob` (optionally tar-wrapped) as a ZFile; FormatError if it is not one."""
        name = blob.name
        head = await blob.pread(0, HEAD_SIZE)
        inner: Blob = blob
        blob_offset = 0
        if unwrap:
            payload = payload_slice(blob, head)
            if payload is not None:
                inner, blob_offset = payload, payload.start
                head = head[blob_offset:]
        if len(head) < SLOT_SIZE:
            head = await inner.pread(0, SLOT_SIZE)
        slot = head[:SLOT_SIZE]
        if not has_magic(slot):
            raise FormatError(f"{name}: not a ZFile (no ZFile magic at offset {blob_offset})")
        if not is_zfile(slot):
            raise FormatError(
                f"{name}: ZFile slot at offset {blob_offset} is not a header (flag bit 0 clear)"
            )
        where = f"{name}: ZFile header at offset {blob_offset}"
        header = decode_slot(slot, where=where)
        check_digest(slot, header, where=where)
        size = inner.size
        if size < 2 * SLOT_SIZE:
            raise FormatError(f"{name}: {size} bytes is too short for a ZFile (truncated?)")
        tail = b""
        tail_start = size
        if header.header_overwritten:
            ht = header
        else:
            if not header.is_data:
                raise FormatError(f"{where}: not a data file (flag bit 1 clear)")
            tail_start = max(SLOT_SIZE, size - TAIL_PREFETCH)
            tail = await inner.pread(tail_start, size - tail_start)
            if len(tail) != size - tail_start:
                raise FormatError(f"{name}: short read of the ZFile trailer (truncated?)")
            trailer_at = size - SLOT_SIZE
            where = f"{name}: ZFile trailer at offset {blob_offset + trailer_at}"
            slot = tail[-SLOT_SIZE:]
            if not has_magic(slot):
                raise FormatError(f"{where}: no ZFile trailer magic (truncated file?)")
            ht = decode_slot(slot, where=where)
            if ht.is_header or not ht.is_data or not ht.is_sealed:
                raise FormatError(
                    f"{where}: flags 0x{ht.flags:x} do not describe a sealed data trailer"
                )
            check_digest(slot, ht, where=where)
        check_geometry(ht, data_end=size - SLOT_SIZE, where=where)
        index_len = INDEX_ENTRY_SIZE * ht.index_size
        if ht.index_offset >= tail_start:
            start = ht.index_offset - tail_start
            index = tail[start : start + index_len]
        else:
            index = await inner.pread(ht.index_offset, index_len)
        if len(index) != index_len:
            raise FormatError(f"{name}: short read of the ZFile index (truncated?)")
        table = build_jump_table(index, ht, where=where)
        return cls(
            inner, ht, table, verify=verify, name=name, blob_offset=blob_offset, header=header
        )

    # --- Blob interface --------------------------------------------------------------------

    @property
    def size(self) -> int:
        return self._size

    @property
    def block_size(self) -> int:
        return self._bs

    @property
    def n_blocks(self) -> int:
        return self._n

    @property
    def stored_size(self) -> int:
        """Bytes of the ZFile as stored (header, blocks, index, trailer)."""
        return self.inner.size

    async def aclose(self) -> None:
        self._cached = (-1, b"")
        await self.inner.aclose()

    async def pread(self, offset: int, length: int) -> bytes:
        """Return up to `length` uncompressed bytes at `offset`, decoding only touched blocks."""
        if offset < 0 or length < 0:
            raise ValueError(f"negative offset or length: {offset}, {length}")
        end = offset + length
        if end > self._size:
            end = self._size
        if offset >= end:
            return b""
        shift = self._shift
        first = offset >> shift
        last = (end - 1) >> shift
        lo = offset - (first << shift)
        cached_no, block = self._cached
        if first == last and first == cached_no:
            return (
                block if lo == 0 and end - offset == len(block) else block[lo : lo + end - offset]
            )
        offsets = self._offsets
        start = offsets[first]
        stop = offsets[last + 1]
        sync_pread = self._sync_pread
        if sync_pread is not None:  # local files: skip a coroutine per call
            raw = sync_pread(start, stop - start)
        else:
            raw = await self.inner.pread(start, stop - start)
        if len(raw) != stop - start:
            raise FormatError(
                f"{self.name}: short read of ZFile blocks {first}..{last} at offset "
                f"{self.blob_offset + start} ({len(raw)} of {stop - start} bytes; truncated?)"
            )
        if first == last:  # the common small read: one block, no join
            n = stop - start
            strip = self._strip
            if not self.verify or _std_crc32c(raw, SALT_STD) == STD_RESIDUE:
                try:
                    block = self._raw_decompress(
                        memoryview(raw)[: n - strip] if strip else raw, self._bs
                    )
                except Exception:
                    block = None
                want = self._tail if first == self._n - 1 else self._bs
                if block is not None and len(block) == want:
                    self._cached = (first, block)
                    hi = end - (first << shift)
                    return block if lo == 0 and hi == len(block) else block[lo:hi]
        return self._decode_run(first, last, raw, start, lo, end - (last << shift))

    # --- decoding --------------------------------------------------------------------------

    def _decode_run(self, first: int, last: int, raw: bytes, base: int, lo: int, hi: int) -> bytes:
        """Decode blocks first..last from `raw` (stored bytes from offset `base`) and join
        them, trimming `lo` bytes from the first block and keeping `hi` of the last."""
        mv = memoryview(raw)
        offsets = self._offsets
        verify = self.verify
        keep = -self._strip or None  # slice end that drops the checksum
        decompress = self._raw_decompress
        crc = _std_crc32c
        bs = self._bs
        count = last + 1 - first
        ends_file = last == self._n - 1
        bounds = [x - base for x in offsets[first : last + 2]]
        parts: list = []
        append = parts.append
        try:
            for a, b in pairwise(bounds):
                stored = mv[a:b]
                if verify and crc(stored, SALT_STD) != STD_RESIDUE:
                    break
                data = decompress(stored[:keep], bs)
                if len(data) != bs and not (ends_file and len(parts) == count - 1):
                    break
                append(data)
        except Exception:
            pass
        if ends_file and len(parts) == count and len(parts[-1]) != self._tail:
            parts.pop()  # the file's last block must have exactly the tail length
        if len(parts) != count:
            # rare: the checked slow path raises a precise error naming the block
            for j in range(first + len(parts), last + 1):
                append(self._decode(j, mv, offsets[j] - base, offsets[j + 1] - base))
        last_block = parts[-1]
        self._cached = (last, last_block)
        if first == last:
            return last_block if lo == 0 and hi == len(last_block) else last_block[lo:hi]
        if lo:
            parts[0] = memoryview(parts[0])[lo:]
        if hi != len(last_block):
            parts[-1] = memoryview(last_block)[:hi]
        return b"".join(parts)

    def _decode(self, i: int, mv: memoryview, a: int, b: int, verify: bool | None = None) -> bytes:
        """Check and decompress block `i`, whose stored bytes are `mv[a:b]`."""
        stored = mv[a:b]
        if (self.verify if verify is None else verify) and not salted_block_ok(stored):
            raise self._checksum_error(i, stored)
        try:
            data = self._decompress(stored[: b - a - self._strip], self._bs)
        except CodecError as exc:
            raise self._block_error(i, str(exc)) from None
        if len(data) != (self._tail if i == self._n - 1 else self._bs):
            raise self._length_error(i, len(data))
        return data

    def _where(self, i: int) -> str:
        start = self._offsets[i]
        stored = self._offsets[i + 1] - start
        return (
            f"{self.name}: ZFile block {i} (uncompressed offset {i * self._bs}, stored at "
            f"offset {self.blob_offset + start}, {stored} bytes)"
        )

    def _checksum_error(self, i: int, stored: memoryview) -> CorruptDataError:
        (kept,) = struct.unpack_from("<I", stored, len(stored) - CHECKSUM_SIZE)
        actual = crc_salt(stored[:-CHECKSUM_SIZE])
        return CorruptDataError(
            f"{self._where(i)}: checksum mismatch (stored 0x{kept:08x}, computed 0x{actual:08x})"
        )

    def _block_error(self, i: int, reason: str) -> CorruptDataError:
        return CorruptDataError(f"{self._where(i)}: {reason}")

    def _length_error(self, i: int, got: int) -> CorruptDataError:
        want = self._tail if i == self._n - 1 else self._bs
        return CorruptDataError(f"{self._where(i)}: decompressed to {got} bytes, expected {want}")

    # --- whole-file checks -----------------------------------------------------------------

    async def iter_bad_blocks(self, *, chunk: int = VERIFY_CHUNK) -> AsyncIterator[BadBlock]:
        """Check every block (checksum when present, decompression, length); yield failures."""
        offsets = self._offsets
        i = 0
        n = self._n
        while i < n:
            j = i
            limit = offsets[i] + chunk
            while j + 1 < n and offsets[j + 2] <= limit:
                j += 1
            start, stop = offsets[i], offsets[j + 1]
            raw = await self.inner.pread(start, stop - start)
            if len(raw) != stop - start:
                for k in range(i, n):
                    yield BadBlock(
                        k,
                        self.blob_offset + offsets[k],
                        offsets[k + 1] - offsets[k],
                        "missing (file truncated)",
                    )
                return
            mv = memoryview(raw)
            for k in range(i, j + 1):
                try:
                    self._decode(
                        k, mv, offsets[k] - start, offsets[k + 1] - start, bool(self._strip)
                    )
                except CorruptDataError as exc:
                    yield BadBlock(
                        k,
                        self.blob_offset + offsets[k],
                        offsets[k + 1] - offsets[k],
                        str(exc).split("): ", 1)[-1],
                    )
            i = j + 1
