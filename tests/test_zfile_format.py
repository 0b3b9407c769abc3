"""Sans-IO ZFile format (spec §2): slots, flags, digests, index and its bounds."""

from __future__ import annotations

import struct
from dataclasses import replace

import numpy as np
import pytest

from obdfuse.errors import CorruptDataError, FormatError
from obdfuse.zfile import format as fmt

SAMPLES_WITH_FLAGS = [
    # (sample, header flags, trailer flags)
    ("zfile/lz4_bs4.zfile", 0x13, 0x16),
    ("zfile/zstd_bs16.zfile", 0x13, 0x16),
    ("layers/l1.commit.lz4.zfile", 0x1B, 0x16),
]


def _slots(samples, rel):
    data = (samples / rel).read_bytes()
    return data, fmt.decode_slot(data[:512]), fmt.decode_slot(data[-512:])


@pytest.mark.parametrize(("rel", "hflags", "tflags"), SAMPLES_WITH_FLAGS)
def test_sample_slots_rebuild_byte_exactly(samples, rel, hflags, tflags) -> None:
    data, header, trailer = _slots(samples, rel)
    assert (header.flags, trailer.flags) == (hflags, tflags)
    assert fmt.encode_slot(trailer) == data[-512:]
    if header.header_overwritten:
        assert fmt.encode_slot(trailer.with_flags(fmt.FLAGS_OVERWRITTEN_HEADER)) == data[:512]
    else:
        initial = fmt.HeaderTrailer(
            flags=fmt.FLAGS_INITIAL_HEADER,
            block_size=trailer.block_size,
            algorithm=trailer.algorithm,
            verify=trailer.verify,
        )
        assert fmt.encode_slot(initial) == data[:512]
    index = data[trailer.index_offset : trailer.index_offset + 4 * trailer.index_size]
    sizes = np.frombuffer(index, "<u4")
    assert fmt.encode_index(list(sizes)) == index
    assert fmt.index_crc(index) == trailer.index_crc
    # spec §2.1: the index follows the last block, the trailer follows the index
    assert trailer.index_offset == 512 + int(sizes.sum())
    assert len(data) == trailer.index_offset + 4 * trailer.index_size + 512


def test_flag_bits_are_tested_individually(samples) -> None:
    """The old writer of ext4_64 left garbage in the flags (spec §10)."""
    data = (samples / "layers/ext4_64").read_bytes()
    header, trailer = fmt.decode_slot(data[:512]), fmt.decode_slot(data[-512:])
    assert header.flags > 0xFFFF and trailer.flags > 0xFFFF  # garbage in the high bits
    assert header.is_header and header.is_data and not header.header_overwritten
    assert not header.has_digest  # so its garbage digest must not be checked
    assert not trailer.is_header and trailer.is_data and trailer.is_sealed
    fmt.check_digest(data[:512], header, where="h")  # no-op without bit 4
    fmt.check_geometry(trailer, data_end=len(data) - 512, where="t")
    assert trailer.index_size == 132_309 and trailer.original_file_size == 541_937_664


def test_is_zfile() -> None:
    slot = fmt.encode_slot(fmt.HeaderTrailer(flags=fmt.FLAGS_INITIAL_HEADER))
    assert fmt.is_zfile(slot)
    assert not fmt.is_zfile(fmt.encode_slot(fmt.HeaderTrailer(flags=fmt.FLAGS_TRAILER)))
    assert not fmt.is_zfile(b"\0" * 512)
    assert not fmt.is_zfile(slot[:100])
    # a bad digest is still "a ZFile": opening it must fail rather than pass it through raw
    broken = bytearray(slot)
    broken[200] = 1
    assert fmt.is_zfile(bytes(broken))


def test_digest_covers_the_whole_slot() -> None:
    ht = fmt.HeaderTrailer(flags=fmt.FLAGS_TRAILER, index_offset=600, index_size=1)
    slot = fmt.encode_slot(ht)
    decoded = fmt.decode_slot(slot)
    assert decoded.digest == fmt.slot_digest(slot)
    fmt.check_digest(slot, decoded, where="t")
    tail_flip = bytearray(slot)
    tail_flip[511] ^= 0x80
    with pytest.raises(CorruptDataError, match=r"t: digest mismatch \(stored 0x"):
        fmt.check_digest(bytes(tail_flip), decoded, where="t")


def test_decode_rejects_wrong_magic_and_short_slots() -> None:
    slot = bytearray(fmt.encode_slot(fmt.HeaderTrailer(flags=fmt.FLAGS_TRAILER)))
    with pytest.raises(FormatError, match="needs 512"):
        fmt.decode_slot(bytes(slot[:511]), where="x")
    slot[9] ^= 1
    with pytest.raises(FormatError, match="magic mismatch"):
        fmt.decode_slot(bytes(slot), where="x")


def _geometry(**kw) -> fmt.HeaderTrailer:
    base = {
        "flags": fmt.FLAGS_TRAILER,
        "index_offset": 512 + 100,
        "index_size": 2,
        "original_file_size": 8000,
        "block_size": 4096,
    }
    base.update(kw)
    return fmt.HeaderTrailer(**base)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"block_size": 3000}, "block_size 3000 is not a power of two"),
        ({"block_size": 1 << 31}, "block_size 2147483648 is not a power of two up to 65536"),
        ({"block_size": 0}, "block_size 0"),
        ({"algorithm": 0}, "unsupported compression algorithm 0"),
        ({"index_size": 10**12}, "index_size 1000000000000 exceeds the limit 1000000000"),
        ({"index_offset": 100}, "index_offset 100 lies before the first block at 512"),
        ({"index_offset": 10**15}, "lies outside the file"),
        ({"dict_size": 10**9}, "lies before the first block"),
        ({"original_file_size": 9000}, "needs 3 blocks of 4096 bytes but the index has 2"),
        ({"original_file_size": 2**60}, "blocks of 4096 bytes but the index has 2"),
    ],
)
def test_geometry_rejections(changes, message) -> None:
    fmt.check_geometry(_geometry(), data_end=10_000, where="w")
    with pytest.raises(FormatError, match=message):
        fmt.check_geometry(_geometry(**changes), data_end=10_000, where="w")


def _index(*sizes: int) -> bytes:
    return struct.pack(f"<{len(sizes)}I", *sizes)


def test_jump_table_offsets() -> None:
    ht = _geometry(index_offset=512 + 300 + 7)
    table = fmt.build_jump_table(_index(100, 200), ht, where="w", check_crc=False)
    assert list(table.offsets) == [512, 612, 812]
    assert table.n_blocks == 2 and table.max_stored == 200
    empty = fmt.build_jump_table(b"", replace(ht, index_size=0, original_file_size=0), where="w")
    assert list(empty.offsets) == [512] and empty.n_blocks == 0


@pytest.mark.parametrize(
    ("sizes", "message"),
    [
        ((100, 4), r"index entry 1 \(at offset \d+\) gives block 1 a stored length of 4 bytes"),
        ((0, 100), "index entry 0 .* stored length of 0 bytes"),
        ((100, 70000), "index entry 1 .* 70000 bytes, more than any 4096-byte block can take"),
        ((100, 4000), "places blocks up to offset 4612, past the index itself at 812"),
    ],
)
def test_jump_table_rejects_hostile_entries(sizes, message) -> None:
    ht = _geometry(index_offset=812)
    with pytest.raises(FormatError, match=message):
        fmt.build_jump_table(_index(*sizes), ht, where="w", check_crc=False)


def test_jump_table_checks_index_crc_only_with_digest_bit() -> None:
    index = _index(100, 200)
    good = _geometry(index_offset=812, index_crc=fmt.index_crc(index))
    fmt.build_jump_table(index, good, where="w")
    wrong = replace(good, index_crc=good.index_crc ^ 1)
    with pytest.raises(CorruptDataError, match="index at offset 812 fails its CRC"):
        fmt.build_jump_table(index, wrong, where="w")
    # old writers (bit 4 clear) leave garbage in index_crc: not checked (spec §10)
    fmt.build_jump_table(index, wrong.with_flags(fmt.FLAG_DATA | fmt.FLAG_SEALED), where="w")


def test_checksum_less_entries_may_be_tiny() -> None:
    ht = _geometry(index_offset=512 + 3, verify=False)
    assert fmt.build_jump_table(_index(1, 2), ht, where="w", check_crc=False).n_blocks == 2
