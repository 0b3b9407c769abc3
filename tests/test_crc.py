"""Raw CRC-32C (spec §1): the vectors of the spec and the residue trick the reader uses."""

from __future__ import annotations

import os

from obdfuse.crc import SALT, crc_raw, crc_salt, salted_block_ok


def test_spec_vectors() -> None:
    assert crc_raw(b"123456789") == 0x58E3FA20
    assert crc_salt(b"123456789") == 0x3C9BD4E0
    assert crc_raw(b"") == 0
    assert crc_salt(b"") == 0x000186A7 == SALT


def test_raw_crc_chains_like_a_register() -> None:
    data = os.urandom(1000)
    assert crc_raw(data[400:], crc_raw(data[:400], 7)) == crc_raw(data, 7)
    assert crc_salt(memoryview(data)) == crc_raw(bytearray(data), 100007)


def test_salted_block_residue() -> None:
    block = os.urandom(333)
    good = block + crc_salt(block).to_bytes(4, "little")
    assert salted_block_ok(good)
    assert salted_block_ok(memoryview(good))
    bad = bytearray(good)
    bad[10] ^= 1
    assert not salted_block_ok(bad)
    assert not salted_block_ok(block + (crc_salt(block) ^ 1).to_bytes(4, "little"))
