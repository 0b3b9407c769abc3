"""Writing ZFiles to a file object (spec §2.1, §2.4, §2.8).

Owns: splitting input into blocks, compressing them (in a thread pool: the
codecs release the GIL), appending the per-block checksum, and laying out
header 0x13 → blocks → index → trailer 0x16, then rewriting the header as 0x1B
when the output is seekable. Non-seekable outputs get the streaming form
(header stays 0x13; readers use the trailer). Must not: read ZFiles or know
about tar (see `obdfuse.tarwrap`).
"""

from __future__ import annotations

import fcntl
import os
import struct
from array import array
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import BinaryIO

from obdfuse.crc import crc_raw, crc_salt
from obdfuse.errors import ObdfuseError
from obdfuse.zfile.codec import BlockCompressor, block_compressor
from obdfuse.zfile.format import (
    ALGORITHMS,
    DEFAULT_BLOCK_SIZE,
    FLAGS_INITIAL_HEADER,
    FLAGS_OVERWRITTEN_HEADER,
    FLAGS_TRAILER,
    UPSTREAM_MAX_STORED_BLOCK,
    WRITER_BLOCK_SIZES,
    HeaderTrailer,
    encode_index,
    encode_slot,
)

#: Uncompressed bytes handed to one compression task.
BATCH_BYTES = 256 * 1024

_pack_crc = struct.Struct("<I").pack


class UpstreamLimitError(ObdfuseError):
    """A block would be unreadable by the upstream overlaybd reader."""


def _compress_batch(
    data: bytes, block_size: int, compress, checksum: bool
) -> tuple[bytes, list[int]]:
    """Compress `data` block by block; return the stored bytes and each block's stored size."""
    parts: list[bytes] = []
    sizes: list[int] = []
    for a in range(0, len(data), block_size):
        c = compress(data[a : a + block_size])
        parts.append(c)
        if checksum:
            parts.append(_pack_crc(crc_salt(c)))
            sizes.append(len(c) + 4)
        else:
            sizes.append(len(c))
    return b"".join(parts), sizes


def can_rewrite(fileobj: BinaryIO) -> bool:
    """True if we may seek back in `fileobj` and overwrite bytes already written
    (seekable, and not opened for appending, where every write lands at the end)."""
    try:
        if not fileobj.seekable():
            return False
    except (AttributeError, OSError, ValueError):
        return False
    if "a" in getattr(fileobj, "mode", ""):
        return False
    try:
        fd = fileobj.fileno()
    except (AttributeError, OSError, ValueError):
        return True  # an in-memory file
    return not fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_APPEND


class ZFileWriter:
    """Compress a byte stream into a ZFile written to `fileobj`.

    `write()` accepts any bytes-like data; `close()` writes the index and the trailer
    (and rewrites the header when the output is seekable) but does not close `fileobj`.
    Blocks whose stored size would exceed upstream's 64 KiB read buffer (only possible
    with 64 KiB blocks of incompressible data) raise UpstreamLimitError unless
    `allow_upstream_unreadable` is set. `compressor` overrides the codec backend (the
    default prefers the system libraries that reproduce upstream's blocks exactly).
    """

    def __init__(
        self,
        fileobj: BinaryIO,
        *,
        algorithm: str = "lz4",
        block_size: int = DEFAULT_BLOCK_SIZE,
        checksum: bool = True,
        workers: int | None = None,
        overwrite_header: bool | None = None,
        allow_upstream_unreadable: bool = False,
        compressor: BlockCompressor | None = None,
    ) -> None:
        if algorithm not in ALGORITHMS:
            raise ObdfuseError(
                f"unknown ZFile algorithm {algorithm!r} (choose from {', '.join(ALGORITHMS)})"
            )
        if block_size not in WRITER_BLOCK_SIZES:
            raise ObdfuseError(
                f"ZFile block size {block_size} not supported (use a power of two from 4K to 64K)"
            )
        self._f = fileobj
        self._bs = block_size
        self._checksum = checksum
        self._codec = compressor or block_compressor(ALGORITHMS[algorithm])
        if self._codec.algorithm != ALGORITHMS[algorithm]:
            raise ValueError(
                f"compressor is for algorithm {self._codec.algorithm}, not {algorithm}"
            )
        self._allow_big = allow_upstream_unreadable
        self._overwrite = can_rewrite(fileobj) if overwrite_header is None else overwrite_header
        self._start = fileobj.tell() if self._overwrite else 0
        self._slot = HeaderTrailer(
            flags=FLAGS_INITIAL_HEADER,
            block_size=block_size,
            algorithm=ALGORITHMS[algorithm],
            verify=checksum,
        )
        if workers is None:
            workers = min(4, os.cpu_count() or 1)
        self._pool = ThreadPoolExecutor(workers, "zfile-compress") if workers > 1 else None
        self._window = 2 * workers
        self._inflight: deque[Future] = deque()
        self._pending = bytearray()
        self._batch = max(block_size, BATCH_BYTES // block_size * block_size)
        self._sizes = array("I")
        self._pos = 0
        self._total = 0
        self._closed = False
        self.trailer: HeaderTrailer | None = None
        self._put(encode_slot(self._slot))

    @property
    def reference_blocks(self) -> bool:
        """True if blocks are byte-identical to upstream's (system codec library in use)."""
        return self._codec.reference

    @property
    def bytes_in(self) -> int:
        return self._total

    @property
    def bytes_out(self) -> int:
        return self._pos

    def _put(self, data: bytes) -> None:
        self._f.write(data)
        self._pos += len(data)

    def write(self, data: bytes | bytearray | memoryview) -> int:
        """Add `data` to the stream; returns its length."""
        if self._closed:
            raise ValueError("write to a closed ZFileWriter")
        n = len(data)
        self._total += n
        pending = self._pending
        batch = self._batch
        if not pending and n >= batch:  # large writes: no staging copy
            src = memoryview(data)
            whole = n // batch * batch
            for a in range(0, whole, batch):
                self._submit(bytes(src[a : a + batch]))
            pending += src[whole:]
            return n
        pending += data
        if len(pending) >= batch:
            whole = len(pending) // batch * batch
            with memoryview(pending) as staged:
                for a in range(0, whole, batch):
                    self._submit(bytes(staged[a : a + batch]))
            del pending[:whole]
        return n

    def _submit(self, chunk: bytes) -> None:
        args = (chunk, self._bs, self._codec.compress, self._checksum)
        if self._pool is None:
            self._emit(*_compress_batch(*args))
            return
        self._inflight.append(self._pool.submit(_compress_batch, *args))
        while len(self._inflight) > self._window:
            self._emit(*self._inflight.popleft().result())

    def _emit(self, stored: bytes, sizes: list[int]) -> None:
        if not self._allow_big and max(sizes) > UPSTREAM_MAX_STORED_BLOCK:
            block = len(self._sizes) + next(
                i for i, s in enumerate(sizes) if s > UPSTREAM_MAX_STORED_BLOCK
            )
            raise UpstreamLimitError(
                f"ZFile block {block} (uncompressed offset {block * self._bs}) is incompressible"
                f" and would be stored in {max(sizes)} bytes; upstream overlaybd cannot read"
                f" blocks over {UPSTREAM_MAX_STORED_BLOCK} bytes: use a block size below 64K"
            )
        self._put(stored)
        self._sizes.extend(sizes)

    def close(self) -> HeaderTrailer:
        """Finish the ZFile; returns the trailer that describes it."""
        if self._closed:
            if self.trailer is None:
                raise ValueError("ZFileWriter was aborted")
            return self.trailer
        try:
            if self._pending:
                self._submit(bytes(self._pending))
                self._pending.clear()
            while self._inflight:
                self._emit(*self._inflight.popleft().result())
            index = encode_index(self._sizes)
            index_offset = self._pos
            self._put(index)
            trailer = HeaderTrailer(
                flags=FLAGS_TRAILER,
                index_offset=index_offset,
                index_size=len(self._sizes),
                original_file_size=self._total,
                index_crc=crc_raw(index),
                block_size=self._bs,
                algorithm=self._slot.algorithm,
                verify=self._checksum,
            )
            self._put(encode_slot(trailer))
            if self._overwrite:
                end = self._f.tell()
                self._f.seek(self._start)
                self._f.write(encode_slot(trailer.with_flags(FLAGS_OVERWRITTEN_HEADER)))
                self._f.seek(end)
            self._f.flush()
            self.trailer = trailer
            return trailer
        except BaseException:
            self.abort()
            raise
        finally:
            self._closed = True
            self._shutdown()

    def abort(self) -> None:
        """Stop without writing an index or trailer (the output is left incomplete)."""
        self._closed = True
        for fut in self._inflight:
            fut.cancel()
        self._inflight.clear()
        self._pending.clear()
        self._shutdown()

    def _shutdown(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def __enter__(self) -> ZFileWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


__all__ = ["UpstreamLimitError", "ZFileWriter", "can_rewrite"]
