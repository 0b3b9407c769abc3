"""The flag bits that ZFile and LSMT header/trailer slots share (spec §2.3, §3.2).

Both formats descend from the same upstream header/trailer layout: bit 0 marks a
header (clear: trailer), bit 1 a data file, bit 2 a sealed file. Owns those bits and
the `SlotFlags` mixin that reads them; each format adds its own higher bits.
"""

from __future__ import annotations

FLAG_HEADER = 1 << 0  # 1 = header, 0 = trailer
FLAG_DATA = 1 << 1  # a data file (not an index file)
FLAG_SEALED = 1 << 2  # sealed: no more writes


class SlotFlags:
    """Readers of the shared flag bits, for any slot class with an int `flags` field."""

    __slots__ = ()
    flags: int

    @property
    def is_header(self) -> bool:
        return bool(self.flags & FLAG_HEADER)

    @property
    def is_data(self) -> bool:
        return bool(self.flags & FLAG_DATA)

    @property
    def is_sealed(self) -> bool:
        return bool(self.flags & FLAG_SEALED)
