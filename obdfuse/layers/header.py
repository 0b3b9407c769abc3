"""The LSMT header/trailer: a 390-byte packed struct in a 4096-byte slot (spec §3.1, §3.2).

Sans-IO: `LsmtHeader.pack()` makes a slot, `LsmtHeader.unpack()` parses and
validates one from untrusted bytes.
"""

from __future__ import annotations

import re
import struct
import uuid as uuidlib
from dataclasses import dataclass, field, replace

from obdfuse.errors import FormatError
from obdfuse.slotflags import FLAG_DATA, FLAG_HEADER, FLAG_SEALED, SlotFlags

SLOT_SIZE = 4096
STRUCT_SIZE = 390
MAGIC0 = bytes.fromhex("4C534D5400010200")  # "LSMT\0\1\2\0"
MAGIC1 = bytes.fromhex("657E63D29444084CA2D2C8EC4FCFAE8A")
NULL_UUID = "00000000-0000-0000-0000-000000000000"
UUID_FIELD = 37
USER_TAG_SIZE = 256
VERSION = 1
SUB_VERSION = 1

# Flag bits (§3.2): bits 0-2 (header, data, sealed) are shared with ZFile (slotflags)
FLAG_SPARSE = 1 << 4

# Observed flag values (§3.2)
COMMIT_HEADER_FLAGS = FLAG_HEADER | FLAG_DATA | FLAG_SEALED  # 0x07
COMMIT_TRAILER_FLAGS = FLAG_DATA | FLAG_SEALED  # 0x06
RW_DATA_FLAGS = FLAG_HEADER | FLAG_DATA  # 0x03
RW_SPARSE_DATA_FLAGS = RW_DATA_FLAGS | FLAG_SPARSE  # 0x13
RW_INDEX_FLAGS = FLAG_HEADER  # 0x01

#: Mappings address 50-bit sector offsets (§3.3): no disk can be larger than this.
MAX_VIRTUAL_SIZE = ((1 << 50) - 1) * 512
MAX_RO_INDEX_SIZE = 1_000_000  # entries in a sealed layer (§3.4)
MAX_RW_INDEX_SIZE = 128_000_000  # entries in an RW index log (§3.5)

_FMT = struct.Struct(f"<8s16sIIQQQ{UUID_FIELD}s{UUID_FIELD}sHBB{USER_TAG_SIZE}s")
assert _FMT.size == STRUCT_SIZE
_UUID_RE = re.compile(r"[0-9A-F]{8}-[0-9A-F]{4}-[0-9A-F]{4}-[0-9A-F]{4}-[0-9A-F]{12}", re.I)


def normalize_uuid(text: str | None) -> str:
    """A UUID string in overlaybd's uppercase form (None or "" → the null UUID)."""
    if not text:
        return NULL_UUID
    try:
        return str(uuidlib.UUID(text)).upper()
    except ValueError:
        raise ValueError(f"not a UUID: {text!r}") from None


def random_uuid() -> str:
    """A fresh random UUID in overlaybd's uppercase form."""
    return str(uuidlib.uuid4()).upper()


@dataclass(frozen=True)
class LsmtHeader(SlotFlags):
    """One LSMT header or trailer slot."""

    flags: int
    index_offset: int = 0
    index_size: int = 0
    virtual_size: int = 0
    uuid: str = NULL_UUID
    parent_uuid: str = NULL_UUID
    version: int = VERSION
    sub_version: int = SUB_VERSION
    user_tag: bytes = field(default=b"")

    @property
    def is_sparse(self) -> bool:
        return bool(self.flags & FLAG_SPARSE)

    def replace(self, **changes: object) -> LsmtHeader:
        """A copy with some fields changed."""
        return replace(self, **changes)

    def pack(self) -> bytes:
        """The 4096-byte slot."""
        if len(self.user_tag) > USER_TAG_SIZE:
            raise ValueError(f"user tag longer than {USER_TAG_SIZE} bytes")
        body = _FMT.pack(
            MAGIC0,
            MAGIC1,
            STRUCT_SIZE,
            self.flags,
            self.index_offset,
            self.index_size,
            self.virtual_size,
            _uuid_field(self.uuid),
            _uuid_field(self.parent_uuid),
            0,
            self.version,
            self.sub_version,
            self.user_tag,
        )
        return body + bytes(SLOT_SIZE - STRUCT_SIZE)

    @classmethod
    def unpack(cls, slot: bytes, where: str) -> LsmtHeader:
        """Parse and sanity-check a slot; `where` names it in errors (file and offset)."""
        if len(slot) < STRUCT_SIZE:
            raise FormatError(f"{where}: truncated LSMT header ({len(slot)} bytes)")
        (m0, m1, size, flags, ioff, isize, vsize, uid, puid, _res, ver, sub, tag) = (
            _FMT.unpack_from(slot)
        )
        if m0 != MAGIC0 or m1 != MAGIC1:
            raise FormatError(f"{where}: not an LSMT header (bad magic)")
        if size != STRUCT_SIZE:
            raise FormatError(f"{where}: LSMT header size {size}, expected {STRUCT_SIZE}")
        if vsize > MAX_VIRTUAL_SIZE:
            raise FormatError(
                f"{where}: virtual size {vsize} exceeds what LSMT can address ({MAX_VIRTUAL_SIZE})"
            )
        return cls(
            flags=flags,
            index_offset=ioff,
            index_size=isize,
            virtual_size=vsize,
            uuid=_parse_uuid(uid, f"{where}: uuid"),
            parent_uuid=_parse_uuid(puid, f"{where}: parent uuid"),
            version=ver,
            sub_version=sub,
            user_tag=tag.rstrip(b"\0"),
        )


def _uuid_field(text: str) -> bytes:
    return normalize_uuid(text).encode("ascii") + b"\0"


def _parse_uuid(raw: bytes, where: str) -> str:
    text_b = raw.split(b"\0", 1)[0]
    try:
        text = text_b.decode("ascii")
    except UnicodeDecodeError:
        raise FormatError(f"{where} is not ASCII: {text_b!r}") from None
    if not text:
        return NULL_UUID
    if not _UUID_RE.fullmatch(text):
        raise FormatError(f"{where} is not a UUID: {text!r}")
    return text.upper()


def is_lsmt(head: bytes) -> bool:
    """Whether bytes start with the LSMT magic."""
    return head[:8] == MAGIC0 and head[8:24] == MAGIC1
