"""The overlaybd one-entry tar wrapper around a layer blob (spec §4.3, detection §4.2).

Owns: recognising the wrapper exactly as overlaybd does (ustar magic + version
"00" + valid header checksum; payload at 1536 after a PAX header, else 512;
size from the PAX `size` record, else the ustar size field), and writing the
wrapper byte for byte as `overlaybd-commit -t` does. `unwrap_tar` is the thin
async shell that turns a wrapped Blob into a SliceBlob of its payload.
Must not: know what the payload is.
"""

from __future__ import annotations

from typing import BinaryIO

from obdfuse.blob import Blob, SliceBlob
from obdfuse.errors import FormatError

BLOCK = 512
HEAD_SIZE = 2048  # bytes `parse_wrapper` wants: up to the payload start plus one block
PAX_PAYLOAD_OFFSET = 3 * BLOCK  # PAX header + PAX data + file header
PLAIN_PAYLOAD_OFFSET = BLOCK
TMAGIC = b"ustar"  # compared over 5 bytes (§4.2), so GNU "ustar " also passes this part
TVERSION = b"00"
PAX_TYPES = (b"x", b"g")
PAX_NAME = b"overlaybd.pax"
PAYLOAD_NAME = b"overlaybd.commit"
DEFAULT_MODE = 0o100644

# ustar field (offset, length)
_NAME = (0, 100)
_MODE = (100, 8)
_UID = (108, 8)
_GID = (116, 8)
_SIZE = (124, 12)
_MTIME = (136, 12)
_CHKSUM = (148, 8)
_TYPEFLAG = (156, 1)
_MAGIC = (257, 6)
_VERSION = (263, 2)
_UNAME = (265, 32)
_GNAME = (297, 32)
_OCTAL_DIGITS = b"01234567"


def _field(block: bytes | memoryview, f: tuple[int, int]) -> bytes:
    return bytes(block[f[0] : f[0] + f[1]])


def header_checksum_ok(block: bytes | memoryview) -> bool:
    """The ustar checksum, accepting the unsigned or the signed byte sum (§4.2)."""
    stored = parse_number(_field(block, _CHKSUM), what="tar header checksum")
    raw = bytes(block[:BLOCK])
    blanked = raw[:148] + b" " * 8 + raw[156:]
    unsigned = sum(blanked)
    signed = unsigned - 256 * sum(1 for b in blanked if b >= 128)
    return stored in (unsigned, signed)


def is_tar_header(block: bytes | memoryview) -> bool:
    """overlaybd's `is_tar_file`: magic `ustar` (5 bytes), version `00`, valid checksum."""
    if len(block) < BLOCK:
        return False
    if _field(block, _MAGIC)[:5] != TMAGIC or _field(block, _VERSION) != TVERSION:
        return False
    try:
        return header_checksum_ok(block)
    except FormatError:
        return False


def parse_number(field: bytes, *, what: str) -> int:
    """A tar numeric field: octal with space/NUL padding, or GNU base-256."""
    if field and field[0] & 0x80:
        value = field[0] & 0x7F
        for b in field[1:]:
            value = (value << 8) | b
        return value
    text = field.split(b"\0", 1)[0].strip(b" ")
    if not text:
        return 0
    if text.strip(_OCTAL_DIGITS):  # int() would also take a sign, "_" or inner spaces
        raise FormatError(f"{what} {field!r} is not an octal number")
    return int(text, 8)


def parse_pax_records(data: bytes) -> dict[str, str]:
    """Decode `"<len> key=value\\n"` records (len counts the whole record)."""
    records: dict[str, str] = {}
    pos = 0
    while pos < len(data) and data[pos] != 0:
        space = data.find(b" ", pos)
        if space < 0:
            raise FormatError(f"PAX record at {pos} has no length")
        try:
            length = int(data[pos:space])
        except ValueError:
            raise FormatError(f"PAX record at {pos} has a bad length") from None
        end = pos + length
        if length <= space - pos + 1 or end > len(data) or data[end - 1 : end] != b"\n":
            raise FormatError(f"PAX record at {pos} is malformed")
        key, sep, value = data[space + 1 : end - 1].partition(b"=")
        if not sep:
            raise FormatError(f"PAX record at {pos} has no '='")
        records[key.decode("utf-8", "replace")] = value.decode("utf-8", "replace")
        pos = end
    return records


def parse_wrapper(head: bytes) -> tuple[int, int] | None:
    """(payload offset, payload size) of an overlaybd tar wrapper, or None if not a tar.

    `head` is the first 2048 bytes of the blob (fewer if the blob is shorter). Raises
    FormatError for a tar whose payload cannot be located.
    """
    if not is_tar_header(head):
        return None
    typeflag = _field(head, _TYPEFLAG)
    if typeflag not in PAX_TYPES:
        return PLAIN_PAYLOAD_OFFSET, parse_number(_field(head, _SIZE), what="tar size field")
    pax_len = parse_number(_field(head, _SIZE), what="PAX header size field")
    if pax_len > BLOCK:
        raise FormatError(
            f"tar: PAX data of {pax_len} bytes spans more than one block; overlaybd places "
            "the payload at 1536 and could not read this wrapper"
        )
    if len(head) < PAX_PAYLOAD_OFFSET:
        raise FormatError(f"tar: wrapper truncated ({len(head)} bytes, PAX needs 1536)")
    records = parse_pax_records(head[BLOCK : BLOCK + pax_len])
    size = 0
    if "size" in records:
        try:
            size = int(records["size"])
        except ValueError:
            raise FormatError(f"tar: PAX size {records['size']!r} is not a number") from None
    if size <= 0:
        file_header = head[2 * BLOCK : 3 * BLOCK]
        size = parse_number(_field(file_header, _SIZE), what="tar size field")
    return PAX_PAYLOAD_OFFSET, size


def payload_slice(blob: Blob, head: bytes) -> SliceBlob | None:
    """The payload of `blob` if it is tar-wrapped (`head`: its first HEAD_SIZE bytes), else None.

    Raises FormatError if the wrapper announces more payload than the blob holds.
    """
    found = parse_wrapper(head)
    if found is None:
        return None
    offset, size = found
    if offset + size > blob.size:
        raise FormatError(
            f"{blob.name}: tar payload at {offset} of {size} bytes runs past the end of the "
            f"blob ({blob.size} bytes; truncated?)"
        )
    return SliceBlob(blob, offset, size, name=blob.name)


async def unwrap_tar(blob: Blob) -> Blob:
    """The payload of a tar-wrapped blob as a SliceBlob, or `blob` itself if not a tar."""
    payload = payload_slice(blob, await blob.pread(0, HEAD_SIZE))
    return blob if payload is None else payload


# --- writer ---------------------------------------------------------------------------------


def _oct8(value: int) -> bytes:
    """8-byte field: octal right-aligned in 6 chars, space, NUL (libtar int_to_oct)."""
    text = b"%6o " % value
    if len(text) > 7:
        raise ValueError(f"{value} does not fit an 8-byte tar field")
    return text + b"\0"


def _oct12(value: int) -> bytes:
    """12-byte field: octal right-aligned in 11 chars, then a space, no NUL."""
    text = b"%11o " % value
    if len(text) > 12:
        raise ValueError(f"{value} does not fit a 12-byte tar field")
    return text


def _put(block: bytearray, f: tuple[int, int], value: bytes) -> None:
    if len(value) > f[1]:
        raise ValueError(f"tar field value {value!r} longer than {f[1]} bytes")
    block[f[0] : f[0] + len(value)] = value


def _seal(block: bytearray) -> None:
    block[148:156] = b" " * 8
    _put(block, _CHKSUM, _oct8(sum(block)))


def pax_size_record(payload_size: int) -> bytes:
    """`"<len> size=<payload_size>\\n"`, where len counts the whole record."""
    body = b" size=%d\n" % payload_size
    length = len(body) + len(str(len(body)))
    if len(str(length)) + len(body) != length:
        length += 1
    return b"%d" % length + body


def build_header(
    payload_size: int,
    *,
    mode: int = DEFAULT_MODE,
    uid: int = 0,
    gid: int = 0,
    uname: str = "root",
    gname: str = "root",
) -> bytes:
    """The 1536 bytes in front of the payload: PAX header, PAX data, file header (§4.3)."""
    if payload_size < 0:
        raise ValueError("negative payload size")
    record = pax_size_record(payload_size)
    pax = bytearray(BLOCK)
    _put(pax, _NAME, PAX_NAME)
    _put(pax, _SIZE, _oct12(len(record)))
    _put(pax, _TYPEFLAG, b"x")
    _put(pax, _MAGIC, b"ustar\0")
    _put(pax, _VERSION, TVERSION)
    _seal(pax)
    data = bytearray(BLOCK)
    data[: len(record)] = record
    entry = bytearray(BLOCK)
    _put(entry, _NAME, PAYLOAD_NAME)
    _put(entry, _MODE, _oct8(mode))
    _put(entry, _UID, _oct8(uid))
    _put(entry, _GID, _oct8(gid))
    _put(entry, _SIZE, _oct12(0))
    _put(entry, _MTIME, _oct12(0))
    _put(entry, _TYPEFLAG, b"0")
    _put(entry, _MAGIC, b"ustar\0")
    _put(entry, _VERSION, TVERSION)
    _put(entry, _UNAME, uname.encode()[:31])
    _put(entry, _GNAME, gname.encode()[:31])
    _seal(entry)
    return bytes(pax + data + entry)


def build_trailer(payload_size: int) -> bytes:
    """Zero padding of the payload to 512 bytes, then two zero blocks."""
    return bytes(-payload_size % BLOCK + 2 * BLOCK)


def wrapped_size(payload_size: int) -> int:
    """Total size of a wrapped blob: 1536 + roundup512(payload) + 1024."""
    return PAX_PAYLOAD_OFFSET + payload_size + len(build_trailer(payload_size))


def write_wrapped(src: BinaryIO, dst: BinaryIO, payload_size: int, **header: object) -> None:
    """Copy exactly `payload_size` bytes from `src` to `dst` inside the wrapper."""
    dst.write(build_header(payload_size, **header))  # type: ignore[arg-type]
    remaining = payload_size
    while remaining:
        chunk = src.read(min(remaining, 1 << 20))
        if not chunk:
            raise FormatError(
                f"tar: payload ended {remaining} bytes short of the announced {payload_size}"
            )
        dst.write(chunk)
        remaining -= len(chunk)
    dst.write(build_trailer(payload_size))


__all__ = [
    "build_header",
    "build_trailer",
    "is_tar_header",
    "parse_wrapper",
    "payload_slice",
    "unwrap_tar",
    "wrapped_size",
    "write_wrapped",
]
