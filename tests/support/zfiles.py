"""Helpers for ZFile tests: build files in memory, read them back, patch their slots."""

from __future__ import annotations

import io
from dataclasses import replace

import trio

from obdfuse.blob import BytesBlob
from obdfuse.zfile import ZFileReader, ZFileWriter
from obdfuse.zfile.format import SLOT_SIZE, decode_slot, encode_slot


def make_zfile(data: bytes, *, seekable: bool = True, **kw) -> bytes:
    """`data` compressed into a ZFile held in memory."""
    buf = io.BytesIO()
    with ZFileWriter(buf, overwrite_header=seekable, **kw) as w:
        w.write(data)
    return buf.getvalue()


async def read_all_async(blob, *, chunk: int = 1 << 20, **kw) -> bytes:
    """Open `blob` as a ZFile and read it whole, `chunk` bytes per pread."""
    reader = await ZFileReader.open(blob, **kw)
    out = bytearray()
    while len(out) < reader.size:
        piece = await reader.pread(len(out), chunk)
        assert piece, "pread returned nothing before the end"
        out += piece
    return bytes(out)


def read_all(zfile: bytes, *, chunk: int = 1 << 20, **kw) -> bytes:
    """Open the in-memory ZFile and return its whole content, `chunk` bytes per pread."""
    blob = BytesBlob(zfile, name="mem.zfile")
    return trio.run(lambda: read_all_async(blob, chunk=chunk, **kw))


def open_reader(zfile: bytes, **kw) -> ZFileReader:
    return trio.run(lambda: ZFileReader.open(BytesBlob(zfile, name="mem.zfile"), **kw))


def patch_slot(zfile: bytes, at: int, **changes) -> bytes:
    """Rewrite the slot at byte `at` (negative = from the end) with new field values;
    the digest is recomputed so that only the changed fields are wrong."""
    buf = bytearray(zfile)
    start = at if at >= 0 else len(buf) + at
    ht = decode_slot(bytes(buf[start : start + SLOT_SIZE]))
    buf[start : start + SLOT_SIZE] = encode_slot(replace(ht, **changes))
    return bytes(buf)
