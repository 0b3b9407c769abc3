"""ZFileWriter: round trips, layout byte-exact against the reference samples, limits."""

from __future__ import annotations

import io
import os
import random
from dataclasses import replace

import numpy as np
import pytest

from obdfuse.errors import ObdfuseError
from obdfuse.zfile import ZFileWriter
from obdfuse.zfile import codec as codec_mod
from obdfuse.zfile import writer as writer_mod
from obdfuse.zfile.format import (
    ALGO_LZ4,
    ALGO_ZSTD,
    FLAGS_INITIAL_HEADER,
    FLAGS_OVERWRITTEN_HEADER,
    FLAGS_TRAILER,
    WRITER_BLOCK_SIZES,
    decode_slot,
)
from obdfuse.zfile.writer import UpstreamLimitError
from tests.support.zfiles import make_zfile, read_all


def _mixed(n: int, seed: int = 1) -> bytes:
    rng = random.Random(seed)
    out = bytearray()
    while len(out) < n:
        kind = rng.randrange(3)
        size = rng.randrange(1, 9000)
        if kind == 0:
            out += rng.randbytes(size)
        elif kind == 1:
            out += bytes(size)
        else:
            out += (b"the quick brown fox %d " % rng.randrange(100)) * (size // 20 + 1)
    return bytes(out[:n])


@pytest.mark.parametrize("algorithm", ["lz4", "zstd"])
@pytest.mark.parametrize("block_size", WRITER_BLOCK_SIZES)
def test_round_trip_all_sizes(algorithm, block_size) -> None:
    for n in (0, 1, block_size - 1, block_size, block_size + 1, 3 * block_size + 17):
        data = _mixed(n, seed=n) if block_size < 65536 else b"compressible " * (n // 13 + 1)
        data = data[:n]
        for checksum in (True, False):
            zf = make_zfile(data, algorithm=algorithm, block_size=block_size, checksum=checksum)
            assert read_all(zf) == data, (algorithm, block_size, n, checksum)
            trailer = decode_slot(zf[-512:])
            assert trailer.index_size == -(-n // block_size)
            assert trailer.verify == checksum and trailer.block_size == block_size


def test_empty_input_layout() -> None:
    zf = make_zfile(b"", seekable=False)
    assert len(zf) == 1024
    t = decode_slot(zf[-512:])
    assert (t.index_offset, t.index_size, t.original_file_size, t.index_crc) == (512, 0, 0, 0)
    assert read_all(zf) == b""


class _Pipe(io.BytesIO):
    def seekable(self) -> bool:
        return False


def test_streaming_and_seekable_outputs() -> None:
    data = _mixed(50_000)
    pipe = _Pipe()
    with ZFileWriter(pipe) as w:
        w.write(data)
    streamed = pipe.getvalue()
    assert decode_slot(streamed[:512]).flags == FLAGS_INITIAL_HEADER
    assert decode_slot(streamed[-512:]).flags == FLAGS_TRAILER
    seekable = make_zfile(data)
    header, trailer = decode_slot(seekable[:512]), decode_slot(seekable[-512:])
    assert header.flags == FLAGS_OVERWRITTEN_HEADER
    # the rewritten header carries exactly the trailer's fields
    assert replace(header, flags=FLAGS_TRAILER, digest=trailer.digest) == trailer
    assert seekable[512:-512] == streamed[512:-512]  # only the header differs
    assert read_all(streamed) == read_all(seekable) == data


def test_header_rewrite_respects_the_start_position() -> None:
    buf = io.BytesIO()
    buf.write(b"P" * 1536)
    with ZFileWriter(buf) as w:
        w.write(b"hello" * 1000)
    out = buf.getvalue()
    assert out[:1536] == b"P" * 1536
    assert decode_slot(out[1536:2048]).flags == FLAGS_OVERWRITTEN_HEADER
    assert read_all(out[1536:]) == b"hello" * 1000


def test_chunking_and_workers_do_not_change_the_output() -> None:
    data = _mixed(700_000, seed=3)
    one = make_zfile(data, workers=1)
    buf = io.BytesIO()
    rng = random.Random(5)
    with ZFileWriter(buf, overwrite_header=True, workers=3) as w:
        pos = 0
        while pos < len(data):
            step = rng.choice([1, 100, 4095, 4097, 300_000])
            w.write(memoryview(data)[pos : pos + step])
            pos += step
    assert buf.getvalue() == one


def _stored_blocks(zf: bytes) -> list[bytes]:
    t = decode_slot(zf[-512:])
    sizes = np.frombuffer(zf[t.index_offset : t.index_offset + 4 * t.index_size], "<u4")
    out, pos = [], 512
    for s in sizes:
        out.append(zf[pos : pos + int(s) - (4 if t.verify else 0)])
        pos += int(s)
    return out


@pytest.mark.parametrize(
    ("rel", "seekable"),
    [
        ("zfile/lz4_bs4.zfile", False),  # overlaybd-zfile: streaming form, 0x13 / 0x16
        ("zfile/zstd_bs16.zfile", False),
        ("layers/l1.commit.lz4.zfile", True),  # overlaybd-commit -z: header rewritten 0x1B
    ],
)
def test_layout_is_byte_exact_around_reference_blocks(samples, monkeypatch, rel, seekable):
    """Feed the writer the sample's own compressed blocks: everything else must match."""
    ref = (samples / rel).read_bytes()
    t = decode_slot(ref[-512:])
    blocks = iter(_stored_blocks(ref))
    fake = codec_mod.BlockCompressor(t.algorithm, lambda _data: next(blocks), True, "replay")
    monkeypatch.setattr(writer_mod, "block_compressor", lambda _algo: fake)
    payload = read_all(ref)
    algorithm = "lz4" if t.algorithm == ALGO_LZ4 else "zstd"
    out = make_zfile(
        payload, algorithm=algorithm, block_size=t.block_size, seekable=seekable, workers=1
    )
    assert out == ref


@pytest.mark.parametrize(
    ("rel", "algo", "seekable"),
    [
        ("zfile/lz4_bs4.zfile", ALGO_LZ4, False),
        ("zfile/zstd_bs16.zfile", ALGO_ZSTD, False),
        ("layers/l1.commit.lz4.zfile", ALGO_LZ4, True),
    ],
)
def test_system_codec_reproduces_reference_files(samples, rel, algo, seekable) -> None:
    """With the system liblz4 1.9 / libzstd 1.5.4 our output equals the C++ tools' output."""
    if not codec_mod.block_compressor(algo).reference:
        pytest.skip("system liblz4 1.9.x / libzstd 1.5.4 not available")
    ref = (samples / rel).read_bytes()
    t = decode_slot(ref[-512:])
    algorithm = "lz4" if algo == ALGO_LZ4 else "zstd"
    out = make_zfile(read_all(ref), algorithm=algorithm, block_size=t.block_size, seekable=seekable)
    assert out == ref


def test_portable_codecs_write_valid_files(monkeypatch) -> None:
    data = _mixed(100_000, seed=9)
    for algo, name in ((ALGO_LZ4, "lz4"), (ALGO_ZSTD, "zstd")):
        wheel = codec_mod._wheel_lz4() if algo == ALGO_LZ4 else codec_mod._wheel_zstd()
        fake = codec_mod.BlockCompressor(algo, wheel, False, "wheel")
        monkeypatch.setattr(writer_mod, "block_compressor", lambda _a, f=fake: f)
        assert read_all(make_zfile(data, algorithm=name)) == data


def test_incompressible_64k_block_is_refused() -> None:
    data = b"\0" * 65536 + os.urandom(65536)
    with pytest.raises(
        UpstreamLimitError,
        match=r"ZFile block 1 \(uncompressed offset 65536\)"
        r" is incompressible .* use a block size below 64K",
    ):
        make_zfile(data, block_size=65536)
    zf = make_zfile(data, block_size=65536, allow_upstream_unreadable=True)
    assert read_all(zf) == data
    assert read_all(make_zfile(data, block_size=32768)) == data


def test_failed_write_leaves_no_trailer() -> None:
    buf = io.BytesIO()
    with pytest.raises(RuntimeError), ZFileWriter(buf, overwrite_header=False) as w:
        w.write(b"x" * 5000)
        raise RuntimeError("source failed")
    assert decode_slot(buf.getvalue()[:512]).flags == FLAGS_INITIAL_HEADER
    assert len(buf.getvalue()) == 512  # nothing pretends to be a complete ZFile


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"algorithm": "gzip"}, "unknown ZFile algorithm 'gzip'"),
        ({"block_size": 2048}, "block size 2048 not supported"),
        ({"block_size": 131072}, "block size 131072 not supported"),
    ],
)
def test_bad_parameters(kw, message) -> None:
    with pytest.raises(ObdfuseError, match=message):
        ZFileWriter(io.BytesIO(), **kw)


def test_append_mode_output_gets_the_streaming_form(tmp_path) -> None:
    """Seeking back is impossible with O_APPEND: the header must not be rewritten."""
    path = tmp_path / "appended"
    path.write_bytes(b"prefix")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND)
    with os.fdopen(fd, "wb") as f:  # mode says "wb", the fd says append
        assert not writer_mod.can_rewrite(f)
        with ZFileWriter(f) as w:
            w.write(b"data" * 3000)
    out = path.read_bytes()
    assert out[:6] == b"prefix"
    assert decode_slot(out[6:518]).flags == FLAGS_INITIAL_HEADER
    assert read_all(out[6:]) == b"data" * 3000
    with open(tmp_path / "plain", "wb") as f:
        assert writer_mod.can_rewrite(f)
