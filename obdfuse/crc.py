"""Raw CRC-32C as overlaybd uses it (spec §1).

overlaybd's "crc32c" is the bare Castagnoli register update: the caller's
initial value, no pre-inversion and no final XOR. The `crc32c` package computes
the standard (inverted) CRC-32C; the two convert with
`raw(data, c) = std(data, c ^ 0xFFFFFFFF) ^ 0xFFFFFFFF`.
"""

from __future__ import annotations

from crc32c import crc32c as _std_crc32c

_MASK = 0xFFFFFFFF

#: Seed of the ZFile per-block checksum ("well known prime", spec §1).
SALT = 100007

#: `SALT` in the `crc32c` package's (inverted) convention, for hot loops that call it directly.
SALT_STD = SALT ^ _MASK

#: For a raw CRC, appending the CRC as little-endian u32 drives the register to
#: zero. In the standard library's convention that residue reads as 0xFFFFFFFF:
#: `crc32c(block + le32(crc_salt(block)), SALT_STD) == STD_RESIDUE`.
STD_RESIDUE = _MASK


def crc_raw(data: bytes | bytearray | memoryview, init: int = 0) -> int:
    """Raw CRC-32C of `data` starting from register value `init`."""
    return _std_crc32c(data, init ^ _MASK) ^ _MASK


def crc_salt(data: bytes | bytearray | memoryview) -> int:
    """The ZFile per-block checksum: `crc_raw(data, init=100007)`."""
    return _std_crc32c(data, SALT_STD) ^ _MASK


def salted_block_ok(stored: bytes | bytearray | memoryview) -> bool:
    """True if `stored` is block bytes followed by their LE `crc_salt` (one CRC pass)."""
    return _std_crc32c(stored, SALT_STD) == STD_RESIDUE
