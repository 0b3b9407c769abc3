"""overlaybd's I/O trace file and text prefetch list, as pure functions on bytes (spec §7).

Binary trace (§7.1): a 24-byte header (magic 0xC2EF1820, data_size = 24 x
records, raw CRC-32C of the record bytes) followed by 24-byte records
(op 'R', layer index 0 = bottom, count, offset; offsets and counts in the
decompressed layer-file space). Padding bytes are never required to be zero
(upstream leaves them uninitialised) but are covered by the checksum.

Prefetch list (§7.2): text of at most 64 KiB, one absolute path per line,
surrounding spaces trimmed; a trailing `/` or `*` asks for a directory walk.

`classify(size, head)` is the mode decision of §7.2 on a trace path's state.
No IO here, except `read_prefetch_list`, a bounded read of a list file.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Iterable
from dataclasses import dataclass

from obdfuse.crc import crc_raw
from obdfuse.errors import FormatError

MAGIC = 0xC2EF1820  # zlib CRC-32 of "Container Image Trace Format"
HEADER_SIZE = 24
RECORD_SIZE = 24
OP_READ = ord("R")
OP_WRITE = ord("W")  # defined upstream, never recorded nor replayed
#: Upper bound on records in one trace (24 MiB of records): a start-up trace is
#: thousands of records; anything beyond this is not a trace we should load.
MAX_RECORDS = 1 << 20
#: Largest count a record may carry. Upstream replays with a 1 MiB buffer, so its own
#: traces stay below that; larger records are accepted and replayed in pieces.
MAX_RECORD_COUNT = 64 << 20
MAX_READ = 1 << 20  # replay reads and recorded pieces are at most this long
MAX_LAYERS = 255  # the Stack's limit
MAX_PREFETCH_LIST = 64 * 1024  # bytes of text (§7.2)

_HEADER = struct.Struct("<I4xQI4x")
_RECORD = struct.Struct("<B3xIQQ")


@dataclass(frozen=True, slots=True)
class TraceRecord:
    """One recorded read: `count` bytes at `offset` of lower layer `layer` (0 = bottom)."""

    layer: int
    offset: int
    count: int
    op: int = OP_READ


@dataclass(frozen=True, slots=True)
class TraceHeader:
    data_size: int
    checksum: int

    @property
    def records(self) -> int:
        return self.data_size // RECORD_SIZE


def encode_trace(records: Iterable[TraceRecord]) -> bytes:
    """The bytes of a trace file holding `records` (padding zeroed)."""
    body = bytearray()
    for r in records:
        _check_record(r, where="record to encode")
        body += _RECORD.pack(r.op, r.layer, r.count, r.offset)
    return _HEADER.pack(MAGIC, len(body), crc_raw(body)) + bytes(body)


def has_trace_magic(head: bytes) -> bool:
    """True if `head` starts with the trace magic (the §7.2 replay/list decision)."""
    return len(head) >= 4 and struct.unpack_from("<I", head)[0] == MAGIC


def decode_header(head: bytes, file_size: int, *, where: str = "trace") -> TraceHeader:
    """Validate the 24-byte header against the file size, before anything is allocated."""
    if len(head) < HEADER_SIZE:
        raise FormatError(f"{where}: {len(head)} bytes is too short for a trace header "
                          f"({HEADER_SIZE} bytes)")
    magic, data_size, checksum = _HEADER.unpack_from(head)
    if magic != MAGIC:
        raise FormatError(f"{where}: bad magic {magic:#010x} at offset 0 "
                          f"(expected {MAGIC:#010x})")
    if data_size % RECORD_SIZE:
        raise FormatError(f"{where}: data_size {data_size} is not a multiple of "
                          f"{RECORD_SIZE} (header at offset 8)")
    if data_size > MAX_RECORDS * RECORD_SIZE:
        raise FormatError(f"{where}: data_size {data_size} ({data_size // RECORD_SIZE} records) "
                          f"exceeds the limit of {MAX_RECORDS} records")
    if file_size != HEADER_SIZE + data_size:
        raise FormatError(f"{where}: file is {file_size} bytes but the header announces "
                          f"{HEADER_SIZE} + {data_size} (truncated or trailing bytes)")
    return TraceHeader(data_size, checksum)


def decode_trace(data: bytes, *, where: str = "trace", layers: int | None = None
                 ) -> list[TraceRecord]:
    """Parse and verify a whole trace file; `layers` bounds the layer indexes if given."""
    header = decode_header(data[:HEADER_SIZE], len(data), where=where)
    body = memoryview(data)[HEADER_SIZE:]
    actual = crc_raw(body)
    if actual != header.checksum:
        raise FormatError(f"{where}: checksum {actual:#010x} of the records does not match "
                          f"{header.checksum:#010x} in the header")
    records = []
    for i, (op, layer, count, offset) in enumerate(_RECORD.iter_unpack(body)):
        rec = TraceRecord(layer, offset, count, op)
        _check_record(rec, where=f"{where}: record #{i} at offset "
                      f"{HEADER_SIZE + i * RECORD_SIZE}", layers=layers)
        records.append(rec)
    return records


def _check_record(r: TraceRecord, *, where: str, layers: int | None = None) -> None:
    if r.op not in (OP_READ, OP_WRITE):
        raise FormatError(f"{where}: unknown op {r.op:#04x} (expected 'R' or 'W')")
    limit = MAX_LAYERS if layers is None else layers
    if not 0 <= r.layer < limit:
        raise FormatError(f"{where}: layer index {r.layer} out of range (image has "
                          f"{limit} layers)")
    if not 0 <= r.count <= MAX_RECORD_COUNT:
        raise FormatError(f"{where}: count {r.count} exceeds {MAX_RECORD_COUNT} bytes")
    if not 0 <= r.offset < 1 << 63:
        raise FormatError(f"{where}: offset {r.offset} out of range")


# ---- prefetch list (§7.2) ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PrefetchPath:
    """One line of a prefetch list: an absolute path, walked if it names a directory tree."""

    path: str
    walk: bool = False


def parse_prefetch_list(data: bytes, *, where: str = "prefetch list") -> list[PrefetchPath]:
    """Parse the text form; blank lines are skipped, relative paths rejected."""
    if len(data) > MAX_PREFETCH_LIST:
        raise FormatError(f"{where}: {len(data)} bytes exceeds the limit of "
                          f"{MAX_PREFETCH_LIST} for a prefetch list")
    try:
        text = data.decode()
    except UnicodeDecodeError as exc:
        raise FormatError(f"{where}: not UTF-8 text (byte {exc.start}); neither a binary "
                          "trace (no magic) nor a prefetch list") from None
    out = []
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line:
            continue
        if "\0" in line:
            raise FormatError(f"{where}: line {lineno} contains a NUL byte")
        walk = line.endswith(("/", "*"))
        path = line.rstrip("/*") if walk else line
        if not line.startswith("/"):
            raise FormatError(f"{where}: line {lineno}: {line!r} is not an absolute path")
        out.append(PrefetchPath(path or "/", walk))
    return out


def read_prefetch_list(path: str, *, where: str | None = None) -> list[PrefetchPath]:
    """Read and parse a prefetch list file, reading at most one byte past the limit."""
    with open(path, "rb") as fh:
        data = fh.read(MAX_PREFETCH_LIST + 1)
    return parse_prefetch_list(data, where=where or str(path))


def encode_prefetch_list(paths: Iterable[PrefetchPath]) -> bytes:
    """The text form of `paths` (directory walks get a trailing `/`)."""
    lines = [p.path.rstrip("/") + "/" if p.walk else p.path for p in paths]
    return "".join(line + "\n" for line in lines).encode()


# ---- mode detection (§7.2) --------------------------------------------------------------


class TraceMode(enum.Enum):
    DISABLED = "disabled"
    RECORD = "record"
    REPLAY = "replay"
    PREFETCH_LIST = "prefetch-list"


def classify(size: int | None, head: bytes) -> TraceMode:
    """The §7.2 mode of a trace path: `size` None = missing, `head` = its first bytes."""
    if size is None:
        return TraceMode.DISABLED
    if size == 0:
        return TraceMode.RECORD
    if has_trace_magic(head):
        return TraceMode.REPLAY
    return TraceMode.PREFETCH_LIST
