"""SCSI block commands (SBC-3/SPC-4) over a `BlockDevice`: one logical unit.

Owns CDB decoding, range and field checks, INQUIRY/VPD/mode pages, the
reservation and unit-attention state of the LU, and mapping of device errors to
sense data. It knows nothing about iSCSI PDUs: the session hands it a CDB plus
the data-out bytes and gets back status, data-in and sense.
"""

from __future__ import annotations

import hashlib
import logging
import struct
from dataclasses import dataclass, field

import trio

from obdfuse.device import BlockDevice
from obdfuse.errors import CorruptDataError, RemoteError
from obdfuse.iscsi import sense as S
from obdfuse.iscsi.reservations import PersistentReservations, port_of
from obdfuse.iscsi.sense import ScsiError, illegal

log = logging.getLogger("obdfuse.iscsi")

BLOCK = 512
LBPPBE = 0  # physical block = logical block (see docs: GET LBA STATUS tests)
MAX_TRANSFER_BLOCKS = 16384  # 8 MiB per command
OPTIMAL_TRANSFER_BLOCKS = 2048
MAX_UNMAP_BLOCKS = 1 << 20
MAX_UNMAP_DESCRIPTORS = 256
MAX_WRITE_SAME_BLOCKS = 0xFFFF
MAX_COMPARE_AND_WRITE_BLOCKS = 255
WRITE_SAME_CHUNK = 1 << 20

VENDOR = b"OBDFUSE "
PRODUCT = b"overlaybd image  "[:16]
REVISION = b"0001"


@dataclass(frozen=True, slots=True)
class ScsiResult:
    """What a command produced: status, data-in bytes, optional sense."""

    status: int = S.GOOD
    data: bytes | bytearray | memoryview = b""
    sense: S.Sense | None = None


@dataclass
class _NexusState:
    unit_attentions: list[tuple[int, int]] = field(default_factory=list)


# opcode -> (cdb length, service action or None, name)
_OPCODES: dict[int, tuple[int, str]] = {
    0x00: (6, "TEST UNIT READY"), 0x03: (6, "REQUEST SENSE"), 0x08: (6, "READ(6)"),
    0x0A: (6, "WRITE(6)"), 0x12: (6, "INQUIRY"), 0x15: (6, "MODE SELECT(6)"),
    0x16: (6, "RESERVE(6)"), 0x17: (6, "RELEASE(6)"), 0x1A: (6, "MODE SENSE(6)"),
    0x1B: (6, "START STOP UNIT"), 0x25: (10, "READ CAPACITY(10)"), 0x28: (10, "READ(10)"),
    0x2A: (10, "WRITE(10)"), 0x2E: (10, "WRITE AND VERIFY(10)"), 0x2F: (10, "VERIFY(10)"),
    0x34: (10, "PRE-FETCH(10)"), 0x37: (10, "READ DEFECT DATA(10)"),
    0xB7: (12, "READ DEFECT DATA(12)"), 0x35: (10, "SYNCHRONIZE CACHE(10)"),
    0x41: (10, "WRITE SAME(10)"), 0x42: (10, "UNMAP"), 0x5A: (10, "MODE SENSE(10)"),
    0x88: (16, "READ(16)"), 0x89: (16, "COMPARE AND WRITE"), 0x8A: (16, "WRITE(16)"),
    0x8B: (16, "ORWRITE(16)"), 0x8E: (16, "WRITE AND VERIFY(16)"), 0x8F: (16, "VERIFY(16)"),
    0x90: (16, "PRE-FETCH(16)"), 0x91: (16, "SYNCHRONIZE CACHE(16)"),
    0x93: (16, "WRITE SAME(16)"), 0xA0: (12, "REPORT LUNS"), 0xA8: (12, "READ(12)"),
    0xAA: (12, "WRITE(12)"), 0xAE: (12, "WRITE AND VERIFY(12)"), 0xAF: (12, "VERIFY(12)"),
}
# (opcode, service action) for commands that have one.
_SERVICE_ACTIONS: dict[tuple[int, int], tuple[int, str]] = {
    (0x9E, 0x10): (16, "READ CAPACITY(16)"),
    (0x9E, 0x12): (16, "GET LBA STATUS"),
    (0xA3, 0x0C): (12, "REPORT SUPPORTED OPERATION CODES"),
    **{(0x5E, sa): (10, "PERSISTENT RESERVE IN") for sa in range(4)},
    **{(0x5F, sa): (10, "PERSISTENT RESERVE OUT") for sa in range(7)},
}
_EXACT_DATA_OUT = {0x41, 0x93, 0x89}
_WRITES = {0x0A, 0x2A, 0xAA, 0x8A, 0x2E, 0xAE, 0x8E, 0x41, 0x93, 0x42, 0x89, 0x8B}
# Commands allowed through a RESERVE(6) held by another nexus (SPC-2 §5.5.1).
_RESERVATION_EXEMPT = {0x12, 0xA0, 0x03, 0x17, 0x25, 0x9E, 0xA3}
# Commands a persistent reservation never blocks (SPC-4 §5.12.1, table 47).
_PR_EXEMPT = {0x00, 0x03, 0x12, 0x1A, 0x5A, 0x25, 0x9E, 0xA0, 0xA3, 0x5E, 0x5F}
_PR_WRITES = {0x35, 0x91, 0x15}  # besides _WRITES: cache flush, MODE SELECT
# Commands that do not report a pending unit attention (SPC-4 §5.14).
_UA_EXEMPT = {0x12, 0xA0, 0x03}


def _be(b: bytes | memoryview, start: int, end: int) -> int:
    return int.from_bytes(b[start:end], "big")


def _truncate(data: bytes | bytearray, alloc: int) -> bytes | bytearray:
    return data if len(data) <= alloc else data[:alloc]


def _usage_map(opcode: int, length: int) -> bytes:
    """A CDB usage bitmap: the opcode, then every field bit we may look at."""
    return bytes([opcode]) + b"\xff" * (length - 2) + b"\x07"


class LogicalUnit:
    """One SCSI direct-access LU backed by a BlockDevice."""

    def __init__(self, device: BlockDevice, *, lun: int = 0, name: str = "obdfuse") -> None:
        self.device = device
        self.lun = lun
        self.blocks = device.size // BLOCK
        digest = hashlib.sha256(f"{name}:{lun}".encode()).digest()
        self.serial = digest[:8].hex().upper().encode()
        self.naa = bytes([0x60 | (digest[8] & 0x0F)]) + digest[9:24]
        self.d_sense = False
        self.swp = False
        self.reservation: str | None = None
        self._nexus: dict[str, _NexusState] = {}
        self.thin = not device.read_only
        self._write_lock = trio.Lock()
        self.pr = PersistentReservations()
        self._logged: set[str] = set()

    # ------------------------------------------------------------ nexus state

    def attach(self, nexus: str) -> None:
        """A new I_T nexus logged in."""
        self._nexus[nexus] = _NexusState()

    def detach(self, nexus: str) -> None:
        """The I_T nexus is gone: drop its state and any reservation it held."""
        self._nexus.pop(nexus, None)
        if self.reservation == nexus:
            self.reservation = None

    def reset(self, by: str, code: tuple[int, int] = S.LUN_RESET_OCCURRED) -> None:
        """LOGICAL UNIT RESET (or a target reset): clear RESERVE(6) reservations and
        raise a unit attention for every I_T nexus, the requester's included (SAM-5
        §7.7; multipath initiators look for it on every path)."""
        self.reservation = None
        for st in self._nexus.values():
            st.unit_attentions.append(code)

    def _pending_ua(self, nexus: str) -> tuple[int, int] | None:
        st = self._nexus.get(nexus)
        if st and st.unit_attentions:
            return st.unit_attentions.pop(0)
        return None

    # ------------------------------------------------------------ entry points

    def data_out_length(self, cdb: bytes) -> int:
        """Bytes of data-out this CDB asks for (0 if none or if the CDB is invalid)."""
        op = cdb[0]
        try:
            if op in (0x0A, 0x2A, 0xAA, 0x8A, 0x2E, 0xAE, 0x8E, 0x8B):
                _, n = self._lba_len(cdb)
                return n * BLOCK if n <= MAX_TRANSFER_BLOCKS else 0
            if op in (0x2F, 0xAF, 0x8F):
                if not cdb[1] & 0x02:
                    return 0
                _, n = self._lba_len(cdb)
                return n * BLOCK if n <= MAX_TRANSFER_BLOCKS else 0
            if op == 0x89:
                n = cdb[13]
                return 2 * n * BLOCK if n <= MAX_COMPARE_AND_WRITE_BLOCKS else 0
            if op == 0x41:
                return BLOCK
            if op == 0x93:
                return 0 if cdb[1] & 0x01 else BLOCK
            if op == 0x42:
                return min(_be(cdb, 7, 9), 16 * MAX_UNMAP_DESCRIPTORS + 8)
            if op == 0x15:
                return cdb[4]
            if op == 0x5F:
                return min(_be(cdb, 5, 9), 1024)
        except ScsiError:
            return 0
        return 0

    async def execute(self, nexus: str, cdb: bytes, data: bytes = b"",
                      edtl: int | None = None) -> ScsiResult:
        """Run one command for `nexus`; never raises for SCSI-level errors.

        `data` is the data-out received; `edtl` the transport's expected transfer
        length (None: the length the CDB implies).
        """
        op = cdb[0]
        try:
            if edtl is not None and op in _EXACT_DATA_OUT and edtl != self.data_out_length(cdb):
                raise illegal()  # WRITE SAME / COMPARE AND WRITE need exactly their data
            if op not in _UA_EXEMPT:
                ua = self._pending_ua(nexus)
                if ua is not None:
                    raise ScsiError(S.UNIT_ATTENTION, ua)
            if (self.reservation is not None and self.reservation != nexus
                    and op not in _RESERVATION_EXEMPT):
                return ScsiResult(S.RESERVATION_CONFLICT)
            if op not in _PR_EXEMPT and self.pr.conflicts(
                    nexus, writes=op in _WRITES or op in _PR_WRITES):
                return ScsiResult(S.RESERVATION_CONFLICT)
            handler = _HANDLERS.get(op)
            if handler is None:
                raise illegal(S.INVALID_OPCODE)
            if op in _WRITES:
                # Commands run concurrently; modifications take turns so that
                # COMPARE AND WRITE / ORWRITE stay atomic against other writes.
                async with self._write_lock:
                    return await handler(self, nexus, cdb, data)
            return await handler(self, nexus, cdb, data)
        except ScsiError as exc:
            return ScsiResult(exc.status, b"", exc.sense)
        except CorruptDataError as exc:
            self._log_once(exc)
            return ScsiResult(S.CHECK_CONDITION, b"",
                              S.Sense(S.MEDIUM_ERROR, *S.UNRECOVERED_READ_ERROR))
        except RemoteError as exc:
            self._log_once(exc)
            return ScsiResult(S.CHECK_CONDITION, b"",
                              S.Sense(S.NOT_READY, *S.LU_COMMUNICATION_FAILURE))
        except PermissionError:
            return ScsiResult(S.CHECK_CONDITION, b"", S.Sense(S.DATA_PROTECT, *S.WRITE_PROTECTED))
        except OSError:
            return ScsiResult(S.CHECK_CONDITION, b"", S.Sense(S.MEDIUM_ERROR, *S.WRITE_ERROR))

    def _log_once(self, exc: Exception) -> None:
        """Log each distinct device error once (they name the layer and offset)."""
        text = str(exc)
        if text not in self._logged and len(self._logged) < 1024:
            self._logged.add(text)
            log.error("LUN %d: %s", self.lun, text)

    def sense_bytes(self, sense: S.Sense) -> bytes:
        """Sense data in the format the Control mode page selects."""
        return sense.encode(self.d_sense)

    # ------------------------------------------------------------ helpers

    def _lba_len(self, cdb: bytes) -> tuple[int, int]:
        op = cdb[0]
        size = op >> 5
        if size == 0:  # 6-byte
            lba = _be(cdb, 1, 4) & 0x1FFFFF
            n = cdb[4] or 256
            return lba, n
        if size in (1, 2):  # 10-byte
            return _be(cdb, 2, 6), _be(cdb, 7, 9)
        if size == 5:  # 12-byte
            return _be(cdb, 2, 6), _be(cdb, 6, 10)
        if size == 4:  # 16-byte
            return _be(cdb, 2, 10), _be(cdb, 10, 14)
        raise illegal()

    def _check_range(self, lba: int, n: int) -> None:
        if lba + n > self.blocks or lba > self.blocks:
            raise ScsiError(S.ILLEGAL_REQUEST, S.LBA_OUT_OF_RANGE)

    def _check_writable(self) -> None:
        if self.device.read_only or self.swp:
            raise ScsiError(S.DATA_PROTECT, S.WRITE_PROTECTED)

    async def _read(self, lba: int, n: int) -> bytes:
        data = await self.device.pread(lba * BLOCK, n * BLOCK)
        if len(data) < n * BLOCK:  # a device shorter than its block count's end
            data = data + bytes(n * BLOCK - len(data))
        return data

    def _transfer(self, cdb: bytes) -> tuple[int, int]:
        """(LBA, block count) of a read/write CDB, range-checked and within the transfer limit."""
        lba, n = self._lba_len(cdb)
        self._check_range(lba, n)
        if n > MAX_TRANSFER_BLOCKS:
            raise illegal()
        return lba, n

    async def _write(self, lba: int, data: bytes | memoryview, fua: bool) -> None:
        # A short (residual-overflow) transfer ends inside a block: the device keeps
        # the rest of that block (BlockDevice writes need not be sector-aligned, and
        # the Stack's read-modify-write is serialised against FUSE writes too).
        if data:
            await self.device.pwrite(lba * BLOCK, bytes(data))
        if fua:
            await self.device.flush()

    # ------------------------------------------------------------ commands

    async def _tur(self, nexus, cdb, data) -> ScsiResult:
        return ScsiResult()

    async def _request_sense(self, nexus, cdb, data) -> ScsiResult:
        desc = bool(cdb[1] & 0x01)
        return ScsiResult(data=_truncate(S.Sense(S.NO_SENSE, 0, 0).encode(desc), cdb[4]))

    async def _read_cmd(self, nexus, cdb, data) -> ScsiResult:
        op = cdb[0]
        if op != 0x08 and cdb[1] & 0xE0:  # RDPROTECT without protection information
            raise illegal()
        lba, n = self._transfer(cdb)
        if n == 0:
            return ScsiResult()
        return ScsiResult(data=await self._read(lba, n))

    async def _write_cmd(self, nexus, cdb, data) -> ScsiResult:
        op = cdb[0]
        if op != 0x0A and cdb[1] & 0xE0:  # WRPROTECT
            raise illegal()
        lba, n = self._transfer(cdb)
        self._check_writable()
        if n == 0:
            return ScsiResult()
        fua = op != 0x0A and bool(cdb[1] & 0x08)
        await self._write(lba, memoryview(data)[: n * BLOCK], fua)
        return ScsiResult()

    async def _write_verify(self, nexus, cdb, data) -> ScsiResult:
        if cdb[1] & 0xE0:
            raise illegal()
        lba, n = self._transfer(cdb)
        self._check_writable()
        if n:
            await self._write(lba, memoryview(data)[: n * BLOCK], True)
        return ScsiResult()

    async def _verify(self, nexus, cdb, data) -> ScsiResult:
        if cdb[1] & 0xE0:
            raise illegal()
        bytchk = (cdb[1] >> 1) & 0x03
        if bytchk not in (0, 1):
            raise illegal()
        lba, n = self._transfer(cdb)
        if n == 0:
            return ScsiResult()
        current = await self._read(lba, n)
        if bytchk:
            given = bytes(data[: n * BLOCK])
            self._compare(current[: len(given)], given)
        return ScsiResult()

    @staticmethod
    def _compare(current: bytes, given: bytes) -> None:
        if current != given:
            at = next(i for i in range(len(given)) if current[i] != given[i])
            raise ScsiError(S.MISCOMPARE, S.MISCOMPARE_DURING_VERIFY, information=at)

    async def _compare_and_write(self, nexus, cdb, data) -> ScsiResult:
        if cdb[1] & 0xE0:
            raise illegal()
        lba = _be(cdb, 2, 10)
        n = cdb[13]
        if n > MAX_COMPARE_AND_WRITE_BLOCKS:
            raise illegal()
        self._check_range(lba, n)
        self._check_writable()
        if n == 0:
            return ScsiResult()
        if len(data) < 2 * n * BLOCK:
            raise illegal()
        verify, new = bytes(data[: n * BLOCK]), bytes(data[n * BLOCK: 2 * n * BLOCK])
        self._compare(await self._read(lba, n), verify)
        await self._write(lba, new, bool(cdb[1] & 0x08))
        return ScsiResult()

    async def _orwrite(self, nexus, cdb, data) -> ScsiResult:
        if cdb[1] & 0xE0:
            raise illegal()
        lba, n = self._transfer(cdb)
        self._check_writable()
        if n == 0:
            return ScsiResult()
        given = bytes(data[: n * BLOCK]).ljust(n * BLOCK, b"\0")
        old = await self._read(lba, n)
        merged = (int.from_bytes(old, "big") | int.from_bytes(given, "big")).to_bytes(
            n * BLOCK, "big")
        await self._write(lba, merged, bool(cdb[1] & 0x08))
        return ScsiResult()

    async def _write_same(self, nexus, cdb, data) -> ScsiResult:
        op = cdb[0]
        flags = cdb[1]
        if flags & 0xE0:
            raise illegal()
        if op == 0x41:
            lba, n = _be(cdb, 2, 6), _be(cdb, 7, 9)
            ndob = False
        else:
            lba, n = _be(cdb, 2, 10), _be(cdb, 10, 14)
            ndob = bool(flags & 0x01)
        unmap = bool(flags & 0x08)
        anchor = bool(flags & 0x10)
        if anchor or (ndob and not unmap):
            raise illegal()
        if lba > self.blocks:
            raise ScsiError(S.ILLEGAL_REQUEST, S.LBA_OUT_OF_RANGE)
        if n == 0:  # WSNZ=0: zero blocks means "to the last LBA"
            n = self.blocks - lba
        if n > MAX_WRITE_SAME_BLOCKS:
            raise illegal()
        self._check_range(lba, n)
        if n == 0:
            return ScsiResult()
        self._check_writable()
        block = bytes(BLOCK) if ndob else bytes(data[:BLOCK]).ljust(BLOCK, b"\0")
        if unmap:  # deallocate (LBPRZ: reads back as zeros), as initiators expect
            await self._discard(lba, n)
            return ScsiResult()
        chunk_blocks = WRITE_SAME_CHUNK // BLOCK
        pattern = block * min(n, chunk_blocks)
        done = 0
        while done < n:
            k = min(n - done, chunk_blocks)
            await self.device.pwrite((lba + done) * BLOCK, pattern[: k * BLOCK])
            done += k
        return ScsiResult()

    async def _discard(self, lba: int, n: int) -> None:
        await self.device.discard(lba * BLOCK, n * BLOCK)

    async def _unmap(self, nexus, cdb, data) -> ScsiResult:
        if cdb[1] & 0x01:  # ANCHOR
            raise illegal()
        self._check_writable()
        plen = _be(cdb, 7, 9)
        if plen == 0:
            return ScsiResult()
        if plen < 8 or len(data) < 8:
            raise ScsiError(S.ILLEGAL_REQUEST, S.PARAMETER_LIST_LENGTH_ERROR)
        bd_len = _be(data, 2, 4)
        if bd_len > len(data) - 8:
            bd_len = (len(data) - 8) // 16 * 16
        count = bd_len // 16
        if count > MAX_UNMAP_DESCRIPTORS:
            raise illegal(S.INVALID_FIELD_IN_PARAMETER_LIST)
        extents = []
        for i in range(count):
            off = 8 + 16 * i
            lba, n = _be(data, off, off + 8), _be(data, off + 8, off + 12)
            if n > MAX_UNMAP_BLOCKS:
                raise illegal(S.INVALID_FIELD_IN_PARAMETER_LIST)
            self._check_range(lba, n)
            extents.append((lba, n))
        for lba, n in extents:
            if n:
                await self._discard(lba, n)
        return ScsiResult()

    async def _prefetch(self, nexus, cdb, data) -> ScsiResult:
        if cdb[0] == 0x34:
            lba, n = _be(cdb, 2, 6), _be(cdb, 7, 9)
        else:
            lba, n = _be(cdb, 2, 10), _be(cdb, 10, 14)
        self._check_range(lba, n)
        if 0 < n <= MAX_TRANSFER_BLOCKS:
            await self._read(lba, n)  # pulls remote blocks into the local cache
        return ScsiResult(S.CONDITION_MET if n <= MAX_TRANSFER_BLOCKS else S.GOOD)

    async def _sync_cache(self, nexus, cdb, data) -> ScsiResult:
        if cdb[0] == 0x35:
            lba, n = _be(cdb, 2, 6), _be(cdb, 7, 9)
        else:
            lba, n = _be(cdb, 2, 10), _be(cdb, 10, 14)
        self._check_range(lba, n)
        await self.device.flush()
        return ScsiResult()

    async def _read_defect_data(self, nexus, cdb, data) -> ScsiResult:
        """A virtual disk has no defects: an empty list in the requested format."""
        if cdb[0] == 0x37:
            flags, alloc = cdb[2], _be(cdb, 7, 9)
            out = bytes([0, flags & 0x1F, 0, 0])
        else:
            flags, alloc = cdb[1], _be(cdb, 6, 10)
            out = bytes([0, flags & 0x1F, 0, 0, 0, 0, 0, 0])
        return ScsiResult(data=_truncate(out, alloc))

    async def _start_stop(self, nexus, cdb, data) -> ScsiResult:
        return ScsiResult()

    async def _reserve(self, nexus, cdb, data) -> ScsiResult:
        if cdb[1] & 0x01:  # extent reservations are obsolete
            raise illegal()
        if self.pr.reservation is not None:
            return ScsiResult(S.RESERVATION_CONFLICT)
        if self.reservation not in (None, nexus):
            return ScsiResult(S.RESERVATION_CONFLICT)
        self.reservation = nexus
        return ScsiResult()

    async def _release(self, nexus, cdb, data) -> ScsiResult:
        if self.reservation == nexus:
            self.reservation = None
        return ScsiResult()

    async def _pr_in(self, nexus, cdb, data) -> ScsiResult:
        action = cdb[1] & 0x1F
        out = {0: self.pr.read_keys, 1: self.pr.read_reservation,
               2: self.pr.report_capabilities, 3: self.pr.read_full_status}.get(action)
        if out is None:
            raise illegal()
        return ScsiResult(data=_truncate(out(), _be(cdb, 7, 9)))

    async def _pr_out(self, nexus, cdb, data) -> ScsiResult:
        if self.reservation is not None and self.reservation != nexus:
            return ScsiResult(S.RESERVATION_CONFLICT)
        plen = _be(cdb, 5, 9)
        try:
            self.pr.out(nexus, cdb[1] & 0x1F, cdb[2], bytes(data[:plen]))
        finally:
            self._deliver_pr_notices()
        return ScsiResult()

    def _deliver_pr_notices(self) -> None:
        notices, self.pr.notices = self.pr.notices, []
        for port, code in notices:
            for key, st in self._nexus.items():
                if port_of(key) == port:
                    st.unit_attentions.append(code)

    async def _read_capacity10(self, nexus, cdb, data) -> ScsiResult:
        if cdb[8] & 0x01 == 0 and _be(cdb, 2, 6):  # LBA without PMI
            raise illegal()
        last = min(self.blocks - 1, 0xFFFFFFFF) if self.blocks else 0
        return ScsiResult(data=struct.pack(">II", last, BLOCK))

    async def _service_action_in(self, nexus, cdb, data) -> ScsiResult:
        sa = cdb[1] & 0x1F
        if sa == 0x10:
            alloc = _be(cdb, 10, 14)
            out = bytearray(32)
            out[0:8] = max(self.blocks - 1, 0).to_bytes(8, "big")
            out[8:12] = BLOCK.to_bytes(4, "big")
            out[13] = LBPPBE
            if self.thin:
                out[14] = 0xC0  # LBPME, LBPRZ
            return ScsiResult(data=_truncate(out, alloc))
        if sa == 0x12:
            return await self._get_lba_status(cdb)
        raise illegal()

    async def _get_lba_status(self, cdb) -> ScsiResult:
        lba = _be(cdb, 2, 10)
        alloc = _be(cdb, 10, 14)
        if lba >= self.blocks:
            raise ScsiError(S.ILLEGAL_REQUEST, S.LBA_OUT_OF_RANGE)
        if alloc < 24:
            return ScsiResult(data=_truncate(bytes(8), alloc))
        span = min(self.blocks - lba, 1 << 20)
        extents = await self._extents(lba, span)
        room = (alloc - 8) // 16
        out = bytearray(8)
        for start, n, mapped in extents[: max(room, 1)]:
            out += start.to_bytes(8, "big") + n.to_bytes(4, "big")
            out += bytes([0 if mapped else 1, 0, 0, 0])
        out[0:4] = (len(out) - 4).to_bytes(4, "big")
        return ScsiResult(data=_truncate(out, alloc))

    async def _extents(self, lba: int, n: int) -> list[tuple[int, int, bool]]:
        query = getattr(self.device, "mapped_extents", None)
        if query is None:
            return [(lba, n, True)]
        out = []
        for off, length, mapped in await query(lba * BLOCK, n * BLOCK):
            first = off // BLOCK
            last = -(-(off + length) // BLOCK)
            if out and out[-1][2] == mapped and out[-1][0] + out[-1][1] >= first:
                p = out[-1]
                out[-1] = (p[0], max(last - p[0], p[1]), mapped)
            else:
                out.append((first, last - first, mapped))
        return out or [(lba, n, True)]

    async def _report_luns(self, nexus, cdb, data) -> ScsiResult:
        if cdb[2] not in (0, 1, 2, 0x10, 0x11, 0x12):
            raise illegal()
        alloc = _be(cdb, 6, 10)
        if alloc < 16:
            raise illegal()
        out = struct.pack(">II", 8, 0) + self.lun.to_bytes(2, "big") + bytes(6)
        return ScsiResult(data=_truncate(out, alloc))

    async def _inquiry(self, nexus, cdb, data) -> ScsiResult:
        evpd = cdb[1] & 0x01
        page = cdb[2]
        alloc = _be(cdb, 3, 5)
        if cdb[1] & 0xFE or (not evpd and page):
            raise illegal()
        if not evpd:
            out = bytearray(74)
            out[0] = 0x00
            out[2] = 0x06  # SPC-4
            out[3] = 0x12  # HiSup, response data format 2
            out[4] = len(out) - 5
            out[7] = 0x02  # CmdQue
            out[8:16] = VENDOR
            out[16:32] = PRODUCT.ljust(16)
            out[32:36] = REVISION
            for i, v in enumerate((0x00A0, 0x0460, 0x04C0, 0x0960)):  # SAM-5 SPC-4 SBC-3 iSCSI
                out[58 + 2 * i: 60 + 2 * i] = v.to_bytes(2, "big")
            return ScsiResult(data=_truncate(out, alloc))
        pages = self._vpd_pages()
        if page not in pages:
            raise illegal()
        return ScsiResult(data=_truncate(pages[page](), alloc))

    def _vpd_pages(self):
        pages = {0x00: self._vpd_supported, 0x80: self._vpd_serial, 0x83: self._vpd_ids,
                 0xB0: self._vpd_block_limits, 0xB1: self._vpd_characteristics}
        if self.thin:
            pages[0xB2] = self._vpd_provisioning
        return pages

    @staticmethod
    def _vpd(page: int, body: bytes) -> bytes:
        return bytes([0, page]) + len(body).to_bytes(2, "big") + body

    def _vpd_supported(self) -> bytes:
        return self._vpd(0x00, bytes(sorted(self._vpd_pages())))

    def _vpd_serial(self) -> bytes:
        return self._vpd(0x80, self.serial)

    def _vpd_ids(self) -> bytes:
        naa = bytes([0x01, 0x03, 0, len(self.naa)]) + self.naa
        t10_id = VENDOR + self.serial
        t10 = bytes([0x02, 0x01, 0, len(t10_id)]) + t10_id
        port = bytes([0x51, 0x94, 0, 4]) + (1).to_bytes(4, "big")  # relative target port 1
        return self._vpd(0x83, naa + t10 + port)

    def _vpd_block_limits(self) -> bytes:
        body = bytearray(0x3C)
        body[1] = MAX_COMPARE_AND_WRITE_BLOCKS
        body[2:4] = (1 << LBPPBE).to_bytes(2, "big")
        body[4:8] = MAX_TRANSFER_BLOCKS.to_bytes(4, "big")
        body[8:12] = OPTIMAL_TRANSFER_BLOCKS.to_bytes(4, "big")
        body[12:16] = MAX_TRANSFER_BLOCKS.to_bytes(4, "big")
        if self.thin:
            body[16:20] = MAX_UNMAP_BLOCKS.to_bytes(4, "big")
            body[20:24] = MAX_UNMAP_DESCRIPTORS.to_bytes(4, "big")
            body[24:28] = (1 << LBPPBE).to_bytes(4, "big")
            body[28:32] = (0x80000000).to_bytes(4, "big")  # UGAVALID, alignment 0
        body[32:40] = MAX_WRITE_SAME_BLOCKS.to_bytes(8, "big")
        return self._vpd(0xB0, bytes(body))

    def _vpd_characteristics(self) -> bytes:
        body = bytearray(0x3C)
        body[0:2] = (1).to_bytes(2, "big")  # non-rotating medium
        return self._vpd(0xB1, bytes(body))

    def _vpd_provisioning(self) -> bytes:
        # LBPU, LBPWS, LBPWS10, LBPRZ; provisioning type thin.
        return self._vpd(0xB2, bytes([0, 0xE4, 0x02, 0]))

    # ------------------------------------------------------------ mode pages

    def _mode_pages(self, page: int, subpage: int, pc: int) -> bytes:
        if pc == 3:
            raise illegal(S.SAVING_PARAMETERS_UNSUPPORTED)
        caching = bytearray(20)
        caching[0], caching[1] = 0x08, 0x12
        control = bytearray(12)
        control[0], control[1] = 0x0A, 0x0A
        if pc == 1:  # changeable values
            control[2] = 0x04  # D_SENSE
        else:
            caching[2] = 0x04  # WCE: writes are cached until SYNCHRONIZE CACHE
            control[2] = 0x04 if (self.d_sense and pc == 0) else 0
            control[3] = 0x10  # unrestricted reordering
            control[4] = 0x08 if (self.swp and pc == 0) else 0
            control[8:10] = b"\xff\xff"
        if subpage not in (0, 0xFF) or (subpage == 0xFF and page != 0x3F):
            raise illegal()
        if page == 0x3F:
            return bytes(caching + control)
        if page == 0x08:
            return bytes(caching)
        if page == 0x0A:
            return bytes(control)
        raise illegal()

    def _device_specific(self) -> int:
        wp = 0x80 if (self.device.read_only or self.swp) else 0
        return wp | 0x10  # DPOFUA

    async def _mode_sense6(self, nexus, cdb, data) -> ScsiResult:
        dbd = bool(cdb[1] & 0x08)
        pages = self._mode_pages(cdb[2] & 0x3F, cdb[3], cdb[2] >> 6)
        desc = b"" if dbd else self._short_block_descriptor()
        body = bytes([0, self._device_specific(), len(desc)]) + desc + pages
        out = bytes([len(body)]) + body
        return ScsiResult(data=_truncate(out, cdb[4]))

    async def _mode_sense10(self, nexus, cdb, data) -> ScsiResult:
        dbd = bool(cdb[1] & 0x08)
        llbaa = bool(cdb[1] & 0x10)
        pages = self._mode_pages(cdb[2] & 0x3F, cdb[3], cdb[2] >> 6)
        if dbd:
            desc = b""
        elif llbaa:
            desc = self.blocks.to_bytes(8, "big") + bytes(4) + BLOCK.to_bytes(4, "big")
        else:
            desc = self._short_block_descriptor()
        hdr = bytes([0, self._device_specific(), 0x01 if (llbaa and not dbd) else 0, 0])
        body = hdr + len(desc).to_bytes(2, "big") + desc + pages
        out = len(body).to_bytes(2, "big") + body
        return ScsiResult(data=_truncate(out, _be(cdb, 7, 9)))

    def _short_block_descriptor(self) -> bytes:
        return bytes([0]) + min(self.blocks, 0xFFFFFF).to_bytes(3, "big") + bytes(
            [0]) + BLOCK.to_bytes(3, "big")

    async def _mode_select6(self, nexus, cdb, data) -> ScsiResult:
        if cdb[1] & 0x01:  # SP
            raise illegal()
        plen = cdb[4]
        if plen == 0:
            return ScsiResult()
        data = bytes(data[:plen])
        if len(data) < 4:
            raise ScsiError(S.ILLEGAL_REQUEST, S.PARAMETER_LIST_LENGTH_ERROR)
        pos = 4 + data[3]
        while pos + 2 <= len(data):
            page, length = data[pos] & 0x3F, data[pos + 1]
            body = data[pos + 2: pos + 2 + length]
            if len(body) < length:
                raise ScsiError(S.ILLEGAL_REQUEST, S.PARAMETER_LIST_LENGTH_ERROR)
            if page == 0x0A and length == 0x0A:
                self.d_sense = bool(body[0] & 0x04)
            elif page == 0x08 and length == 0x12:
                pass  # the cache mode is fixed; accept the page unchanged
            else:
                raise illegal(S.INVALID_FIELD_IN_PARAMETER_LIST)
            pos += 2 + length
        return ScsiResult()

    async def _report_opcodes(self, nexus, cdb, data) -> ScsiResult:
        options = cdb[2] & 0x07
        rctd = bool(cdb[2] & 0x80)
        req_op, req_sa = cdb[3], _be(cdb, 4, 6)
        alloc = _be(cdb, 6, 10)
        timeouts = bytes([0, 0x0A, 0, 0]) + bytes(8) if rctd else b""
        if options == 0:
            out = bytearray(4)
            entries = [(op, 0, False, n) for op, (n, _) in sorted(_OPCODES.items())]
            entries += [(op, sa, True, n) for (op, sa), (n, _) in sorted(_SERVICE_ACTIONS.items())]
            for op, sa, has_sa, n in entries:
                flags = (0x01 if has_sa else 0) | (0x02 if rctd else 0)
                out += bytes([op, 0]) + sa.to_bytes(2, "big") + bytes([0, flags])
                out += n.to_bytes(2, "big") + timeouts
            out[0:4] = (len(out) - 4).to_bytes(4, "big")
            return ScsiResult(data=_truncate(out, alloc))
        # The field pointer tells initiators this is a bad field, not a missing command.
        if options == 1:
            if any(op == req_op for op, _ in _SERVICE_ACTIONS):
                raise illegal(field=2)
            entry = _OPCODES.get(req_op)
        elif options == 2:
            if not any(op == req_op for op, _ in _SERVICE_ACTIONS):
                raise illegal(field=2)
            entry = _SERVICE_ACTIONS.get((req_op, req_sa))
        else:
            raise illegal(field=2)
        if entry is None:
            out = bytes([0, 0x01, 0, 0])  # not supported
        else:
            n = entry[0]
            out = bytes([0, 0x03 | (0x80 if rctd else 0)]) + n.to_bytes(2, "big")
            usage = bytearray(_usage_map(req_op, n))
            if options == 2:
                usage[1] = req_sa
            out += bytes(usage) + timeouts
        return ScsiResult(data=_truncate(out, alloc))

    async def _maintenance_in(self, nexus, cdb, data) -> ScsiResult:
        if cdb[1] & 0x1F == 0x0C:
            return await self._report_opcodes(nexus, cdb, data)
        raise illegal(S.INVALID_OPCODE)


def _bind() -> dict:
    lu = LogicalUnit
    table = {
        0x00: lu._tur, 0x03: lu._request_sense, 0x12: lu._inquiry, 0x15: lu._mode_select6,
        0x16: lu._reserve, 0x17: lu._release, 0x1A: lu._mode_sense6, 0x1B: lu._start_stop,
        0x25: lu._read_capacity10, 0x2E: lu._write_verify, 0x2F: lu._verify,
        0x34: lu._prefetch, 0x35: lu._sync_cache, 0x41: lu._write_same, 0x42: lu._unmap,
        0x5A: lu._mode_sense10, 0x89: lu._compare_and_write, 0x8B: lu._orwrite,
        0x8E: lu._write_verify, 0x8F: lu._verify, 0x90: lu._prefetch, 0x91: lu._sync_cache,
        0x93: lu._write_same, 0x9E: lu._service_action_in, 0xA0: lu._report_luns,
        0x5E: lu._pr_in, 0x5F: lu._pr_out, 0x37: lu._read_defect_data,
        0xB7: lu._read_defect_data,
        0xA3: lu._maintenance_in, 0xAE: lu._write_verify, 0xAF: lu._verify,
    }
    for op in (0x08, 0x28, 0xA8, 0x88):
        table[op] = lu._read_cmd
    for op in (0x0A, 0x2A, 0xAA, 0x8A):
        table[op] = lu._write_cmd
    return table


_HANDLERS = _bind()
