"""Per-block codecs of ZFile: raw LZ4 blocks and zstd level-3 frames (spec §2.4).

Owns: compressing one block and decompressing one block with a capacity of
`block_size`, rejecting output of the wrong length. Must not: know about
offsets, checksums or files.

Compression prefers the system liblz4 / libzstd through ctypes when they are
the versions upstream's samples were produced with (liblz4 1.9.x reproduces the
vendored LZ4 1.8.3 `LZ4_compress_default`; libzstd 1.5.4 is the sample build's):
their blocks are then byte-identical to `overlaybd-zfile`'s. Otherwise the
python-lz4 / zstandard wheels produce different but equally valid blocks (§11.1).
Decompression always uses the wheels.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass

import lz4.block
import zstandard

from obdfuse.errors import CorruptDataError, ObdfuseError
from obdfuse.zfile.format import ALGO_LZ4, ALGO_ZSTD, ALGORITHM_NAMES, ZSTD_LEVEL

Compress = Callable[[bytes], bytes]
#: decompress(stored_block_without_checksum, capacity) -> bytes (may be shorter than capacity)
Decompress = Callable[[bytes | memoryview, int], bytes]

#: Set OBDFUSE_ZFILE_PORTABLE_CODEC=1 to ignore the system libraries.
_PORTABLE_ENV = "OBDFUSE_ZFILE_PORTABLE_CODEC"


class CodecError(CorruptDataError):
    """A block did not decompress (corrupt data or wrong size)."""


# --- decompression (hot path) ----------------------------------------------------------------
#
# `RAW_DECOMPRESSORS` are the bare callables the reader's inner loop calls: they may raise any
# exception on corrupt input (the reader turns it into a CorruptDataError naming the block).
# `DECOMPRESSORS` wrap them with clear CodecError messages for everyone else.

_lz4_decompress = lz4.block.decompress  # positional capacity: (source, uncompressed_size)
_zstd_local = threading.local()
_zstd_content_size = zstandard.frame_content_size


def _zstd_raw(stored: bytes | memoryview, capacity: int) -> bytes:
    # python-zstandard allocates the size a frame announces: refuse oversized claims first
    if _zstd_content_size(stored) > capacity:
        raise CodecError(f"zstd frame announces more than {capacity} bytes")
    dctx = getattr(_zstd_local, "dctx", None)
    if dctx is None:
        dctx = _zstd_local.dctx = zstandard.ZstdDecompressor()
    return dctx.decompress(stored, max_output_size=capacity)


RAW_DECOMPRESSORS: dict[int, Decompress] = {ALGO_LZ4: _lz4_decompress, ALGO_ZSTD: _zstd_raw}


def _checked(algorithm: int) -> Decompress:
    raw = RAW_DECOMPRESSORS[algorithm]
    label = ALGORITHM_NAMES[algorithm]

    def decompress(stored: bytes | memoryview, capacity: int) -> bytes:
        try:
            return raw(stored, capacity)
        except CodecError:
            raise
        except Exception as exc:
            raise CodecError(f"{label} block does not decode into {capacity} bytes: {exc}") from exc

    return decompress


decompress_lz4 = _checked(ALGO_LZ4)
decompress_zstd = _checked(ALGO_ZSTD)
DECOMPRESSORS: dict[int, Decompress] = {ALGO_LZ4: decompress_lz4, ALGO_ZSTD: decompress_zstd}


# --- compression -----------------------------------------------------------------------------


def _load(name: str) -> ctypes.CDLL | None:
    if os.environ.get(_PORTABLE_ENV):
        return None
    path = ctypes.util.find_library(name)
    if not path:
        return None
    try:
        return ctypes.CDLL(path)
    except OSError:
        return None


def _system_lz4() -> Compress | None:
    lib = _load("lz4")
    if lib is None or not hasattr(lib, "LZ4_compress_default"):
        return None
    lib.LZ4_versionNumber.restype = ctypes.c_int
    if lib.LZ4_versionNumber() // 100 != 109:  # 1.9.x matches upstream's vendored 1.8.3
        return None
    fn = lib.LZ4_compress_default
    fn.argtypes = [ctypes.c_char_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_int]
    fn.restype = ctypes.c_int
    local = threading.local()
    string_at = ctypes.string_at

    def compress(data: bytes) -> bytes:
        n = len(data)
        cap = n + n // 255 + 16
        buf = getattr(local, "buf", None)
        if buf is None or len(buf) < cap:
            buf = local.buf = ctypes.create_string_buffer(max(cap, 65536 + 65536 // 255 + 16))
        out = fn(data, buf, n, len(buf))
        if out <= 0 and n:
            raise ObdfuseError(f"liblz4 failed to compress a {n}-byte block")
        return string_at(buf, out)

    return compress


def _system_zstd() -> Compress | None:
    lib = _load("zstd")
    if lib is None or not hasattr(lib, "ZSTD_compressCCtx"):
        return None
    lib.ZSTD_versionNumber.restype = ctypes.c_uint
    if lib.ZSTD_versionNumber() != 10504:  # the libzstd that wrote the reference samples
        return None
    lib.ZSTD_createCCtx.restype = ctypes.c_void_p
    lib.ZSTD_isError.argtypes = [ctypes.c_size_t]
    lib.ZSTD_isError.restype = ctypes.c_uint
    fn = lib.ZSTD_compressCCtx
    fn.argtypes = [
        ctypes.c_void_p,
        ctypes.c_void_p,
        ctypes.c_size_t,
        ctypes.c_char_p,
        ctypes.c_size_t,
        ctypes.c_int,
    ]
    fn.restype = ctypes.c_size_t
    local = threading.local()
    string_at = ctypes.string_at
    is_error = lib.ZSTD_isError

    lib.ZSTD_freeCCtx.argtypes = [ctypes.c_void_p]

    class _Context:
        """A ZSTD_CCtx owned by one thread, freed when the thread's locals go away."""

        def __init__(self) -> None:
            self.ptr = lib.ZSTD_createCCtx()
            if not self.ptr:
                raise MemoryError("ZSTD_createCCtx failed")

        def __del__(self) -> None:
            if self.ptr:
                lib.ZSTD_freeCCtx(self.ptr)
                self.ptr = None

    def compress(data: bytes) -> bytes:
        ctx = getattr(local, "ctx", None)
        if ctx is None:
            ctx = local.ctx = _Context()
            local.buf = ctypes.create_string_buffer(65536 + 65536 // 128 + 1024)
        buf = local.buf
        n = len(data)
        if n + n // 128 + 1024 > len(buf):
            buf = local.buf = ctypes.create_string_buffer(n + n // 128 + 1024)
        out = fn(ctx.ptr, buf, len(buf), data, n, ZSTD_LEVEL)
        if is_error(out):
            raise ObdfuseError(f"libzstd failed to compress a {n}-byte block")
        return string_at(buf, out)

    return compress


def _wheel_lz4() -> Compress:
    compress = lz4.block.compress

    def lz4_compress(data: bytes) -> bytes:
        return compress(data, mode="default", store_size=False)

    return lz4_compress


def _wheel_zstd() -> Compress:
    local = threading.local()

    def zstd_compress(data: bytes) -> bytes:
        cctx = getattr(local, "cctx", None)
        if cctx is None:
            cctx = local.cctx = zstandard.ZstdCompressor(
                level=ZSTD_LEVEL, write_content_size=True, write_checksum=False
            )
        return cctx.compress(data)

    return zstd_compress


@dataclass(frozen=True)
class BlockCompressor:
    """A thread-safe block compressor; `reference` says whether blocks match upstream's."""

    algorithm: int
    compress: Compress
    reference: bool
    backend: str


_compressors: dict[int, BlockCompressor] = {}


def block_compressor(algorithm: int) -> BlockCompressor:
    """The best available compressor for `algorithm` (ALGO_LZ4 or ALGO_ZSTD)."""
    found = _compressors.get(algorithm)
    if found is not None:
        return found
    if algorithm == ALGO_LZ4:
        system = _system_lz4()
        found = (
            BlockCompressor(algorithm, system, True, "liblz4 (system)")
            if system
            else BlockCompressor(algorithm, _wheel_lz4(), False, "python-lz4")
        )
    elif algorithm == ALGO_ZSTD:
        system = _system_zstd()
        found = (
            BlockCompressor(algorithm, system, True, "libzstd (system)")
            if system
            else BlockCompressor(algorithm, _wheel_zstd(), False, "python-zstandard")
        )
    else:
        raise ValueError(f"unsupported algorithm {ALGORITHM_NAMES.get(algorithm, algorithm)}")
    _compressors[algorithm] = found
    return found
