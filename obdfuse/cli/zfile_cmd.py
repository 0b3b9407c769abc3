"""`obdfuse zfile ...`: compress, decompress, verify and describe ZFiles."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from typing import BinaryIO

import click
import trio

from obdfuse.blob import FileBlob
from obdfuse.cli.params import SIZE
from obdfuse.errors import ObdfuseError
from obdfuse.fileio import atomic_output
from obdfuse.tarwrap import PAX_PAYLOAD_OFFSET, build_header, build_trailer, write_wrapped
from obdfuse.zfile import ALGORITHMS, ZFileReader, ZFileWriter
from obdfuse.zfile.writer import can_rewrite

COPY_CHUNK = 4 << 20


@click.group()
def zfile() -> None:
    """Block-compressed random-access files (overlaybd ZFile).

    Files written here are read by overlaybd's `overlaybd-zfile -x`; tar-wrapped
    ZFiles (as `overlaybd-commit -z -t` writes them) are accepted everywhere.
    """


@contextlib.contextmanager
def _output(dst: str) -> Iterator[BinaryIO]:
    """stdout for `-`, else a temporary file renamed over `dst` only on success."""
    if dst == "-":
        yield sys.stdout.buffer
        sys.stdout.buffer.flush()
        return
    with atomic_output(dst) as f:
        yield f


def _input_stream(src: str) -> BinaryIO:
    return sys.stdin.buffer if src == "-" else open(src, "rb")


def _compress_stream(
    src: BinaryIO, out: BinaryIO, algorithm: str, block_size: int, checksum: bool
) -> ZFileWriter:
    writer = ZFileWriter(out, algorithm=algorithm, block_size=block_size, checksum=checksum)
    try:
        while chunk := src.read(COPY_CHUNK):
            writer.write(chunk)
        writer.close()
    except BaseException:
        writer.abort()
        raise
    return writer


@zfile.command()
@click.option(
    "--algorithm",
    type=click.Choice(sorted(ALGORITHMS)),
    default="lz4",
    show_default=True,
    help="Block codec (zstd uses level 3, as upstream).",
)
@click.option(
    "--block-size",
    type=SIZE,
    default="4K",
    show_default=True,
    help="Uncompressed block size: 4K, 8K, 16K, 32K or 64K.",
)
@click.option("--no-checksum", is_flag=True, help="Omit the per-block CRC-32C.")
@click.option("--tar", "tar_wrap", is_flag=True, help="Wrap the ZFile in overlaybd's tar.")
@click.argument("src")
@click.argument("dst")
def compress(
    algorithm: str, block_size: int, no_checksum: bool, tar_wrap: bool, src: str, dst: str
) -> None:
    """Compress SRC into the ZFile DST (`-` = stdin / stdout).

    A seekable DST gets the self-describing header (0x1B) that overlaybd-commit
    writes; stdout pipes get the streaming form (header 0x13, trailer at the end).
    """
    with _input_stream(src) as inp, _output(dst) as out:
        if not tar_wrap:
            writer = _compress_stream(inp, out, algorithm, block_size, not no_checksum)
        elif can_rewrite(out):
            base = out.tell()
            out.write(bytes(PAX_PAYLOAD_OFFSET))
            writer = _compress_stream(inp, out, algorithm, block_size, not no_checksum)
            out.write(build_trailer(writer.bytes_out))
            end = out.tell()
            out.seek(base)
            out.write(build_header(writer.bytes_out))
            out.seek(end)
        else:
            with tempfile.TemporaryFile() as spool:
                writer = _compress_stream(inp, spool, algorithm, block_size, not no_checksum)
                spool.seek(0)
                write_wrapped(spool, out, writer.bytes_out)
    if dst != "-":
        ratio = writer.bytes_out / writer.bytes_in if writer.bytes_in else 0.0
        click.echo(
            f"{dst}: {writer.bytes_in} bytes -> {writer.bytes_out} bytes ({ratio:.1%})", err=True
        )


@contextlib.contextmanager
def _input_blob(src: str) -> Iterator[FileBlob]:
    """A FileBlob of SRC; stdin is first spooled to a temporary file (ZFile needs seeks)."""
    if src != "-":
        blob = FileBlob(src)
        try:
            yield blob
        finally:
            blob.close()
        return
    with tempfile.TemporaryFile() as spool:
        shutil.copyfileobj(sys.stdin.buffer, spool, COPY_CHUNK)
        spool.flush()
        blob = FileBlob("<stdin>", fd=os.dup(spool.fileno()))
        try:
            yield blob
        finally:
            blob.close()


@zfile.command()
@click.argument("src")
@click.argument("dst")
def decompress(src: str, dst: str) -> None:
    """Decompress the ZFile SRC (optionally tar-wrapped) into DST (`-` = stdin / stdout).

    Every block's checksum is verified; on any error DST is not created.
    """

    async def run(blob: FileBlob, out: BinaryIO) -> None:
        reader = await ZFileReader.open(blob)
        offset = 0
        while offset < reader.size:
            data = await reader.pread(offset, COPY_CHUNK)
            out.write(data)
            offset += len(data)

    with _input_blob(src) as blob, _output(dst) as out:
        trio.run(run, blob, out)


@zfile.command()
@click.argument("src")
def verify(src: str) -> None:
    """Check every block of the ZFile SRC; exit 1 naming the bad blocks."""

    async def run(blob: FileBlob) -> tuple[ZFileReader, list]:
        reader = await ZFileReader.open(blob)
        return reader, [bad async for bad in reader.iter_bad_blocks()]

    with _input_blob(src) as blob:
        reader, bad = trio.run(run, blob)
    what = "checksums and decompression" if reader.info.verify else "decompression only"
    if bad:
        for b in bad:
            click.echo(f"{src}: block {b.block} at offset {b.offset}: {b.reason}", err=True)
        listed = ", ".join(str(b.block) for b in bad[:20]) + (", ..." if len(bad) > 20 else "")
        raise ObdfuseError(f"{src}: {len(bad)} of {reader.n_blocks} ZFile blocks are bad: {listed}")
    click.echo(f"{src}: all {reader.n_blocks} blocks OK ({what})")


def describe(reader: ZFileReader) -> dict[str, object]:
    """The facts `zfile info` prints."""
    ht = reader.info
    return {
        "file": reader.name,
        "tar_payload_offset": reader.blob_offset if reader.blob_offset else None,
        "algorithm": ht.algorithm_name,
        "block_size": ht.block_size,
        "checksums": ht.verify,
        "blocks": ht.index_size,
        "original_size": ht.original_file_size,
        "stored_size": reader.stored_size,
        "ratio": round(reader.stored_size / ht.original_file_size, 4)
        if ht.original_file_size
        else None,
        "header_flags": f"0x{reader.header.flags:x}",
        "described_by": "header (overwritten)" if ht.header_overwritten else "trailer",
        "flags": f"0x{ht.flags:x}",
        "digest_checked": ht.has_digest,
        "index_offset": ht.index_offset,
        "index_crc": f"0x{ht.index_crc:08x}",
        "largest_stored_block": reader.table.max_stored,
    }


@zfile.command()
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.argument("src")
def info(as_json: bool, src: str) -> None:
    """Describe the ZFile SRC: codec, block size, sizes, flags, index."""

    async def run(blob: FileBlob) -> dict[str, object]:
        return describe(await ZFileReader.open(blob))

    with _input_blob(src) as blob:
        facts = trio.run(run, blob)
    if as_json:
        click.echo(json.dumps(facts, indent=2))
        return
    width = max(len(k) for k in facts)
    for key, value in facts.items():
        if value is not None:
            click.echo(f"{key.replace('_', ' '):<{width}}  {value}")
