"""ZFileReader: the reference samples, random access, and every kind of bad input."""

from __future__ import annotations

import hashlib
import os
import random
import struct

import pytest
import trio

from obdfuse.blob import BytesBlob, FileBlob
from obdfuse.crc import crc_raw
from obdfuse.errors import CorruptDataError, FormatError
from obdfuse.tarwrap import build_header, build_trailer
from obdfuse.zfile import ZFileReader
from obdfuse.zfile.format import decode_slot
from tests.support.zfiles import make_zfile, open_reader, patch_slot, read_all

PAYLOAD_SHA = "4291aa1112347be8a62f31c153e51e86701aa99b587f9a72cd4f0ac366def885"
L1_SHA = "a0aa4788416f76a7b2a532b1fef1e5398f879a20d0dea0e42f02bc2bb9187f0d"
EXT4_SHA = "799dbd74cbcfbd7f37611057130b20fda0e1e671280df97cc3a05d73620d5ac7"


async def _sha256(path, chunk: int = 4 << 20) -> tuple[str, int]:
    reader = await ZFileReader.open(FileBlob(path))
    h = hashlib.sha256()
    offset = 0
    while offset < reader.size:
        data = await reader.pread(offset, chunk)
        h.update(data)
        offset += len(data)
    await reader.aclose()
    return h.hexdigest(), offset


@pytest.mark.parametrize(
    ("rel", "sha", "size"),
    [
        ("zfile/lz4_bs4.zfile", PAYLOAD_SHA, 3_145_728),
        ("zfile/zstd_bs16.zfile", PAYLOAD_SHA, 3_145_728),
        ("layers/l1.commit.lz4.zfile", L1_SHA, 2_119_680),
    ],
)
def test_reference_samples_decode(samples, rel, sha, size) -> None:
    assert trio.run(_sha256, samples / rel) == (sha, size)


def test_l1_payload_equals_the_plain_commit(samples) -> None:
    zf = (samples / "layers/l1.commit.lz4.zfile").read_bytes()
    assert read_all(zf) == (samples / "layers/l1.commit").read_bytes()


@pytest.mark.slow
def test_old_writer_base_layer_decodes(samples) -> None:
    """ext4_64: garbage flags/digest/index_crc from an old writer, 541 MB of payload."""
    assert trio.run(_sha256, samples / "layers/ext4_64", 16 << 20) == (EXT4_SHA, 541_937_664)


def test_random_access_matches_sequential(samples) -> None:
    zf = (samples / "zfile/zstd_bs16.zfile").read_bytes()
    whole = read_all(zf)
    rng = random.Random(7)

    async def main() -> None:
        reader = await ZFileReader.open(BytesBlob(zf))
        assert reader.size == len(whole) and reader.block_size == 16384
        for _ in range(300):
            off = rng.randrange(0, len(whole) + 100)
            n = rng.choice([0, 1, 511, 4096, 16384, 16385, 70000, rng.randrange(1, 200000)])
            assert await reader.pread(off, n) == whole[off : off + n]
        # block-aligned whole blocks and reads that end exactly at EOF
        assert await reader.pread(16384, 16384) == whole[16384:32768]
        assert await reader.pread(len(whole) - 10, 10) == whole[-10:]
        assert await reader.pread(len(whole), 10) == b""
        with pytest.raises(ValueError):
            await reader.pread(-1, 10)

    trio.run(main)


def test_tar_wrapped_zfile_opens(samples) -> None:
    zf = (samples / "layers/l1.commit.lz4.zfile").read_bytes()
    wrapped = build_header(len(zf)) + zf + build_trailer(len(zf))
    reader = open_reader(wrapped)
    assert reader.blob_offset == 1536 and reader.stored_size == len(zf)
    assert hashlib.sha256(read_all(wrapped)).hexdigest() == L1_SHA


def test_only_touched_blocks_are_read() -> None:
    data = os.urandom(4096 * 50)
    zf = make_zfile(data)
    reads: list[tuple[int, int]] = []

    class Recording(BytesBlob):
        async def pread(self, offset, length):
            reads.append((offset, length))
            return await super().pread(offset, length)

    async def main() -> None:
        reader = await ZFileReader.open(Recording(zf))
        reads.clear()
        assert await reader.pread(4096 * 10 + 5, 4096 * 3) == data[4096 * 10 + 5 : 4096 * 13 + 5]
        # one coalesced read covering exactly blocks 10..13
        offs = reader.table.offsets
        assert reads == [(offs[10], offs[14] - offs[10])]
        reads.clear()
        assert await reader.pread(4096 * 13, 100) == data[4096 * 13 : 4096 * 13 + 100]
        assert reads == []  # served from the last decoded block

    trio.run(main)


def test_file_without_checksums() -> None:
    data = os.urandom(10000) + bytes(30000)
    zf = make_zfile(data, checksum=False, algorithm="zstd", block_size=8192)
    assert read_all(zf) == data
    reader = open_reader(zf)
    assert not reader.info.verify and not reader.verify


def test_header_overwritten_file_does_not_need_its_trailer() -> None:
    data = os.urandom(5000)
    zf = make_zfile(data, seekable=True)
    assert decode_slot(zf[:512]).header_overwritten
    zeroed = zf[:-512] + bytes(512)  # upstream accepts 0x1B with a zeroed trailer
    assert read_all(zeroed) == data


# --- bad input: one test per case, each naming where it is wrong -------------------------------

DATA = bytes(range(256)) * 64 + os.urandom(8192) + b"z" * 5000  # 29,576 bytes: 8 blocks


@pytest.fixture(scope="module")
def good() -> bytes:
    return make_zfile(DATA, seekable=False)  # header 0x13, trailer 0x16


def _block_span(zf: bytes, i: int) -> tuple[int, int]:
    reader = open_reader(zf)
    return reader.table.offsets[i], reader.table.offsets[i + 1]


def test_corrupt_block_is_reported_with_block_and_offset(good) -> None:
    a, b = _block_span(good, 4)
    bad = bytearray(good)
    bad[a + 10] ^= 0xFF
    with pytest.raises(
        CorruptDataError,
        match=rf"mem.zfile: ZFile block 4 \(uncompressed offset 16384, stored at offset {a}, "
        rf"{b - a} bytes\): checksum mismatch",
    ):
        read_all(bytes(bad))

    async def other_blocks_still_read() -> None:
        reader = await ZFileReader.open(BytesBlob(bytes(bad), name="mem.zfile"))
        assert await reader.pread(0, 16384) == DATA[:16384]
        assert await reader.pread(20480, 4096) == DATA[20480:24576]

    trio.run(other_blocks_still_read)


def test_wrong_checksum_bytes(good) -> None:
    a, b = _block_span(good, 2)
    bad = bytearray(good)
    (stored,) = struct.unpack_from("<I", bad, b - 4)
    struct.pack_into("<I", bad, b - 4, stored ^ 0x1234)
    with pytest.raises(
        CorruptDataError, match=rf"block 2 .*stored at offset {a}.*stored 0x{stored ^ 0x1234:08x}"
    ):
        read_all(bytes(bad))


def test_corrupt_block_without_checksum_fails_decompression() -> None:
    zf = make_zfile(b"abc" * 5000, checksum=False, seekable=False)
    a, _ = _block_span(zf, 1)
    bad = bytearray(zf)
    bad[a : a + 2] = b"\xff\xff"  # an LZ4 token announcing a run far past the block
    with pytest.raises(CorruptDataError, match=rf"block 1 .*stored at offset {a}"):
        read_all(bytes(bad))


def test_truncated_file(good) -> None:
    with pytest.raises(FormatError, match=r"ZFile trailer at offset \d+: no ZFile trailer magic"):
        read_all(good[:-100])
    with pytest.raises(FormatError, match="too short for a ZFile"):
        read_all(good[:600])


def test_truncated_header_overwritten_file() -> None:
    zf = make_zfile(DATA, seekable=True)
    with pytest.raises(FormatError, match=r"index at offset \d+ .* lies outside the file"):
        read_all(zf[:-600])


def test_index_pointing_outside_the_file(good) -> None:
    bad = patch_slot(good, -512, index_offset=len(good) + 4096)
    with pytest.raises(
        FormatError,
        match=rf"trailer at offset {len(good) - 512}: index at offset {len(good) + 4096}"
        r" .* lies outside the file",
    ):
        read_all(bad)


def test_index_entry_pointing_past_the_index(good) -> None:
    ht = decode_slot(good[-512:])
    bad = bytearray(good)
    struct.pack_into("<I", bad, ht.index_offset + 4 * 3, 4000)  # block 3 claims 4000 bytes
    index = bytes(bad[ht.index_offset : ht.index_offset + 4 * ht.index_size])
    bad = patch_slot(bytes(bad), -512, index_crc=crc_raw(index))
    with pytest.raises(FormatError, match=r"places blocks up to offset \d+, past the index"):
        read_all(bad)


def test_corrupt_index_fails_its_crc(good) -> None:
    ht = decode_slot(good[-512:])
    bad = bytearray(good)
    bad[ht.index_offset + 1] ^= 1
    with pytest.raises(CorruptDataError, match=rf"index at offset {ht.index_offset} fails its CRC"):
        read_all(bytes(bad))


def test_absurd_index_size_is_rejected_before_allocating(good) -> None:
    reads: list[int] = []

    class Recording(BytesBlob):
        async def pread(self, offset, length):
            reads.append(length)
            return await super().pread(offset, length)

    bad = patch_slot(good, -512, index_size=2**62)
    with pytest.raises(FormatError, match="index_size 4611686018427387904 exceeds the limit"):
        trio.run(ZFileReader.open, Recording(bad, name="mem.zfile"))
    assert max(reads) <= len(bad)
    plausible = patch_slot(good, -512, index_size=10**8, original_file_size=4096 * 10**8)
    with pytest.raises(FormatError, match="lies outside the file"):
        read_all(plausible)


def test_absurd_block_size(good) -> None:
    with pytest.raises(FormatError, match="block_size 1073741824 is not a power of two up to"):
        read_all(patch_slot(good, -512, block_size=1 << 30))
    with pytest.raises(FormatError, match="block_size 5000 is not a power of two"):
        read_all(patch_slot(good, -512, block_size=5000))


def test_not_a_zfile(samples) -> None:
    with pytest.raises(FormatError, match=r"mem.zfile: not a ZFile \(no ZFile magic at offset 0\)"):
        read_all((samples / "layers/l1.commit").read_bytes()[:8192])
    with pytest.raises(FormatError, match="not a ZFile"):
        read_all(b"")
    trailer_first = patch_slot(make_zfile(b"x"), 0, flags=0x16)
    with pytest.raises(FormatError, match="is not a header"):
        read_all(trailer_first)


def test_bad_header_digest(good) -> None:
    bad = bytearray(good)
    bad[300] ^= 1  # in the zero tail of the header slot, covered by the digest
    with pytest.raises(CorruptDataError, match=r"ZFile header at offset 0: digest mismatch"):
        read_all(bytes(bad))


def test_bad_trailer_digest(good) -> None:
    bad = bytearray(good)
    bad[-3] ^= 1
    with pytest.raises(CorruptDataError, match=rf"trailer at offset {len(good) - 512}: digest"):
        read_all(bytes(bad))


def test_wrong_original_size_is_caught_by_length_check(good) -> None:
    ht = decode_slot(good[-512:])
    bad = patch_slot(good, -512, original_file_size=ht.original_file_size + 1)
    with pytest.raises(CorruptDataError, match=r"block 7 .*decompressed to \d+ bytes, expected"):
        read_all(bad)


def test_unsupported_algorithm(good) -> None:
    with pytest.raises(FormatError, match="unsupported compression algorithm 0"):
        read_all(patch_slot(good, -512, algorithm=0))


def test_last_block_longer_than_the_file_says() -> None:
    """A last block that decodes to a full block when the sizes promise less is corrupt."""
    zf = make_zfile(os.urandom(8192), seekable=False)
    bad = patch_slot(zf, -512, original_file_size=8000)
    with pytest.raises(
        CorruptDataError, match=r"block 1 .*decompressed to 4096 bytes, expected 3904"
    ):
        read_all(bad)

    async def small_read() -> None:
        reader = await ZFileReader.open(BytesBlob(bad, name="mem.zfile"))
        with pytest.raises(CorruptDataError, match="expected 3904"):
            await reader.pread(4096, 10)

    trio.run(small_read)


def test_one_reader_shared_by_threads(tmp_path) -> None:
    """The daemon may decode in worker threads: the block cache must stay consistent."""
    import threading

    data = os.urandom(4096 * 64)
    path = tmp_path / "shared.zfile"
    path.write_bytes(make_zfile(data))
    reader = trio.run(ZFileReader.open, FileBlob(path))
    failures: list[str] = []

    def worker(seed: int) -> None:
        rng = random.Random(seed)

        async def reads() -> None:
            for _ in range(1500):
                off = rng.randrange(len(data))
                n = rng.choice([1, 100, 4096, 9000])
                if await reader.pread(off, n) != data[off : off + n]:
                    failures.append(f"wrong bytes at {off}+{n}")

        trio.run(reads)

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == []
