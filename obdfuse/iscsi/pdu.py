"""iSCSI PDU framing and codecs (RFC 7143 §11), sans-IO.

Owns the 48-byte Basic Header Segment, AHS skipping, data-segment padding, the
optional CRC32C header/data digests, and one small immutable dataclass per PDU
type with `decode_pdu`/`encode_pdu`. Invalid input raises `ProtocolError`
carrying the Reject reason the target should answer with. No sockets here.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum

import crc32c as _crc32c

BHS_LEN = 48
DIGEST_LEN = 4
RESERVED_TAG = 0xFFFFFFFF


class Op(IntEnum):
    """PDU opcodes (RFC 7143 §11.2.1.2)."""

    NOP_OUT = 0x00
    SCSI_CMD = 0x01
    TMF_REQ = 0x02
    LOGIN_REQ = 0x03
    TEXT_REQ = 0x04
    DATA_OUT = 0x05
    LOGOUT_REQ = 0x06
    SNACK = 0x10
    NOP_IN = 0x20
    SCSI_RSP = 0x21
    TMF_RSP = 0x22
    LOGIN_RSP = 0x23
    TEXT_RSP = 0x24
    DATA_IN = 0x25
    LOGOUT_RSP = 0x26
    R2T = 0x31
    ASYNC = 0x32
    REJECT = 0x3F


class RejectReason(IntEnum):
    """Reject PDU reasons (RFC 7143 §11.17.1)."""

    DATA_DIGEST = 0x02
    SNACK_REJECT = 0x03
    PROTOCOL_ERROR = 0x04
    COMMAND_NOT_SUPPORTED = 0x05
    IMMEDIATE_COMMAND_REJECT = 0x06
    TASK_IN_PROGRESS = 0x07
    INVALID_DATA_ACK = 0x08
    INVALID_PDU_FIELD = 0x09
    LONG_OP_REJECT = 0x0A
    WAITING_FOR_LOGOUT = 0x0C


class ProtocolError(Exception):
    """The peer broke the protocol; `reason` is what a Reject PDU should say.

    `bhs` is the offending header (echoed in the Reject) when one was read;
    `fatal` means the connection cannot continue (framing is lost).
    """

    def __init__(
        self, message: str, reason: RejectReason = RejectReason.PROTOCOL_ERROR,
        *, bhs: bytes = b"", fatal: bool = True,
    ) -> None:
        super().__init__(message)
        self.reason = reason
        self.bhs = bhs
        self.fatal = fatal


def crc32c(data: bytes | bytearray | memoryview) -> int:
    """CRC32C (Castagnoli) as iSCSI digests use it."""
    return _crc32c.crc32c(data)


def pad_len(n: int) -> int:
    """Bytes of padding after an `n`-byte data segment (to a 4-byte boundary)."""
    return -n & 3


# ---------------------------------------------------------------- framing


@dataclass(frozen=True, slots=True)
class Frame:
    """One PDU as read off the wire: the BHS and its (unpadded) data segment."""

    bhs: bytes
    data: bytes

    @property
    def opcode(self) -> int:
        return self.bhs[0] & 0x3F


class FrameReader:
    """Splits a byte stream into `Frame`s, checking lengths and digests.

    `max_data` bounds the data segment accepted (our declared
    MaxRecvDataSegmentLength), so memory use is bounded before any allocation.
    """

    def __init__(self, max_data: int = 8192) -> None:
        self.max_data = max_data
        self.header_digest = False
        self.data_digest = False
        self._buf = bytearray()

    def feed(self, data: bytes) -> None:
        """Append received bytes."""
        self._buf += data

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def wanted(self) -> int:
        """How many more bytes are needed to complete the next frame (at least 1)."""
        need = self._frame_size()
        return max(1, (need or BHS_LEN) - len(self._buf))

    def _frame_size(self) -> int | None:
        buf = self._buf
        if len(buf) < BHS_LEN:
            return None
        ahs = buf[4] * 4
        dlen = int.from_bytes(buf[5:8], "big")
        if dlen > self.max_data:
            raise ProtocolError(
                f"data segment of {dlen} bytes exceeds MaxRecvDataSegmentLength {self.max_data}",
                bhs=bytes(buf[:BHS_LEN]),
            )
        size = BHS_LEN + ahs + (DIGEST_LEN if self.header_digest else 0)
        if dlen:
            size += dlen + pad_len(dlen) + (DIGEST_LEN if self.data_digest else 0)
        return size

    def next_frame(self) -> Frame | None:
        """The next complete frame, or None if more bytes are needed."""
        size = self._frame_size()
        if size is None or len(self._buf) < size:
            return None
        buf = self._buf
        bhs = bytes(buf[:BHS_LEN])
        pos = BHS_LEN + buf[4] * 4
        if self.header_digest:
            got = int.from_bytes(buf[pos:pos + 4], "little")
            if got != crc32c(buf[:pos]):
                raise ProtocolError("header digest mismatch", bhs=bhs)
            pos += DIGEST_LEN
        dlen = int.from_bytes(bhs[5:8], "big")
        data = b""
        if dlen:
            padded = dlen + pad_len(dlen)
            data = bytes(buf[pos:pos + dlen])
            if self.data_digest:
                got = int.from_bytes(buf[pos + padded:pos + padded + 4], "little")
                if got != crc32c(buf[pos:pos + padded]):
                    del buf[:size]
                    raise ProtocolError(
                        "data digest mismatch", RejectReason.DATA_DIGEST, bhs=bhs, fatal=False
                    )
        del buf[:size]
        return Frame(bhs, data)


def frame_bytes(
    bhs: bytes | bytearray, data: bytes | memoryview = b"", *,
    header_digest: bool = False, data_digest: bool = False,
) -> list[bytes | memoryview]:
    """The wire pieces of one PDU: BHS (+digest), data, padding (+digest)."""
    parts: list[bytes | memoryview] = [bytes(bhs)]
    if header_digest:
        parts.append(crc32c(bhs).to_bytes(4, "little"))
    if data:
        parts.append(data)
        pad = b"\0" * pad_len(len(data))
        if pad:
            parts.append(pad)
        if data_digest:
            c = _crc32c.crc32c(data)
            if pad:
                c = _crc32c.crc32c(pad, c)
            parts.append(c.to_bytes(4, "little"))
    return parts


# ---------------------------------------------------------------- PDU types

_U32 = struct.Struct(">I")


def _u32(b: bytes, off: int) -> int:
    return _U32.unpack_from(b, off)[0]


@dataclass(frozen=True, slots=True)
class NopOut:
    itt: int
    ttt: int
    lun: int
    cmdsn: int
    exp_statsn: int
    immediate: bool
    data: bytes = b""


@dataclass(frozen=True, slots=True)
class ScsiCommand:
    itt: int
    lun: int
    edtl: int
    cmdsn: int
    exp_statsn: int
    cdb: bytes
    read: bool
    write: bool
    final: bool
    immediate: bool
    attr: int = 0
    data: bytes = b""


@dataclass(frozen=True, slots=True)
class TaskManagementRequest:
    itt: int
    function: int
    lun: int
    ref_itt: int
    cmdsn: int
    exp_statsn: int
    ref_cmdsn: int
    immediate: bool


@dataclass(frozen=True, slots=True)
class LoginRequest:
    itt: int
    transit: bool
    cont: bool
    csg: int
    nsg: int
    version_max: int
    version_min: int
    isid: bytes
    tsih: int
    cid: int
    cmdsn: int
    exp_statsn: int
    data: bytes = b""


@dataclass(frozen=True, slots=True)
class TextRequest:
    itt: int
    ttt: int
    final: bool
    cont: bool
    lun: int
    cmdsn: int
    exp_statsn: int
    immediate: bool
    data: bytes = b""


@dataclass(frozen=True, slots=True)
class DataOut:
    itt: int
    ttt: int
    lun: int
    final: bool
    exp_statsn: int
    datasn: int
    offset: int
    data: bytes = b""


@dataclass(frozen=True, slots=True)
class LogoutRequest:
    itt: int
    reason: int
    cid: int
    cmdsn: int
    exp_statsn: int
    immediate: bool


@dataclass(frozen=True, slots=True)
class Snack:
    itt: int
    kind: int


# Target → initiator. Sequence numbers are filled in by the session.


@dataclass(frozen=True, slots=True)
class NopIn:
    itt: int
    ttt: int
    lun: int
    statsn: int
    exp_cmdsn: int
    max_cmdsn: int
    data: bytes = b""


@dataclass(frozen=True, slots=True)
class ScsiResponse:
    itt: int
    status: int
    statsn: int
    exp_cmdsn: int
    max_cmdsn: int
    response: int = 0
    overflow: bool = False
    underflow: bool = False
    residual: int = 0
    exp_datasn: int = 0
    sense: bytes = b""


@dataclass(frozen=True, slots=True)
class DataIn:
    itt: int
    lun: int
    datasn: int
    offset: int
    exp_cmdsn: int
    max_cmdsn: int
    final: bool = False
    status_present: bool = False
    status: int = 0
    statsn: int = 0
    overflow: bool = False
    underflow: bool = False
    residual: int = 0
    data: bytes | memoryview = b""


@dataclass(frozen=True, slots=True)
class R2T:
    itt: int
    ttt: int
    lun: int
    statsn: int
    exp_cmdsn: int
    max_cmdsn: int
    r2tsn: int
    offset: int
    length: int


@dataclass(frozen=True, slots=True)
class TaskManagementResponse:
    itt: int
    response: int
    statsn: int
    exp_cmdsn: int
    max_cmdsn: int


@dataclass(frozen=True, slots=True)
class LoginResponse:
    itt: int
    transit: bool
    csg: int
    nsg: int
    isid: bytes
    tsih: int
    statsn: int
    exp_cmdsn: int
    max_cmdsn: int
    status_class: int = 0
    status_detail: int = 0
    cont: bool = False
    data: bytes = b""


@dataclass(frozen=True, slots=True)
class TextResponse:
    itt: int
    ttt: int
    final: bool
    cont: bool
    statsn: int
    exp_cmdsn: int
    max_cmdsn: int
    data: bytes = b""


@dataclass(frozen=True, slots=True)
class LogoutResponse:
    itt: int
    response: int
    statsn: int
    exp_cmdsn: int
    max_cmdsn: int
    time2wait: int = 0
    time2retain: int = 0


@dataclass(frozen=True, slots=True)
class Reject:
    reason: int
    statsn: int
    exp_cmdsn: int
    max_cmdsn: int
    bhs: bytes = b""


@dataclass(frozen=True, slots=True)
class AsyncMessage:
    event: int
    lun: int
    statsn: int
    exp_cmdsn: int
    max_cmdsn: int
    param1: int = 0
    param2: int = 0
    param3: int = 0
    data: bytes = b""


InitiatorPdu = (
    NopOut | ScsiCommand | TaskManagementRequest | LoginRequest | TextRequest | DataOut
    | LogoutRequest | Snack
)
TargetPdu = (
    NopIn | ScsiResponse | DataIn | R2T | TaskManagementResponse | LoginResponse | TextResponse
    | LogoutResponse | Reject | AsyncMessage
)


def decode_pdu(frame: Frame) -> InitiatorPdu:
    """Decode an initiator PDU; raises ProtocolError for an unknown opcode."""
    b = frame.bhs
    op = b[0] & 0x3F
    imm = bool(b[0] & 0x40)
    f1 = b[1]
    lun = int.from_bytes(b[8:16], "big")
    itt = _u32(b, 16)
    if op == Op.SCSI_CMD:
        return ScsiCommand(
            itt=itt, lun=lun, edtl=_u32(b, 20), cmdsn=_u32(b, 24), exp_statsn=_u32(b, 28),
            cdb=b[32:48], read=bool(f1 & 0x40), write=bool(f1 & 0x20), final=bool(f1 & 0x80),
            immediate=imm, attr=f1 & 7, data=frame.data,
        )
    if op == Op.DATA_OUT:
        return DataOut(
            itt=itt, ttt=_u32(b, 20), lun=lun, final=bool(f1 & 0x80), exp_statsn=_u32(b, 28),
            datasn=_u32(b, 36), offset=_u32(b, 40), data=frame.data,
        )
    if op == Op.NOP_OUT:
        return NopOut(
            itt=itt, ttt=_u32(b, 20), lun=lun, cmdsn=_u32(b, 24), exp_statsn=_u32(b, 28),
            immediate=imm, data=frame.data,
        )
    if op == Op.LOGIN_REQ:
        return LoginRequest(
            itt=itt, transit=bool(f1 & 0x80), cont=bool(f1 & 0x40), csg=(f1 >> 2) & 3,
            nsg=f1 & 3, version_max=b[2], version_min=b[3], isid=b[8:14],
            tsih=int.from_bytes(b[14:16], "big"), cid=int.from_bytes(b[20:22], "big"),
            cmdsn=_u32(b, 24), exp_statsn=_u32(b, 28), data=frame.data,
        )
    if op == Op.TEXT_REQ:
        return TextRequest(
            itt=itt, ttt=_u32(b, 20), final=bool(f1 & 0x80), cont=bool(f1 & 0x40), lun=lun,
            cmdsn=_u32(b, 24), exp_statsn=_u32(b, 28), immediate=imm, data=frame.data,
        )
    if op == Op.TMF_REQ:
        return TaskManagementRequest(
            itt=itt, function=f1 & 0x7F, lun=lun, ref_itt=_u32(b, 20), cmdsn=_u32(b, 24),
            exp_statsn=_u32(b, 28), ref_cmdsn=_u32(b, 32), immediate=imm,
        )
    if op == Op.LOGOUT_REQ:
        return LogoutRequest(
            itt=itt, reason=f1 & 0x7F, cid=int.from_bytes(b[20:22], "big"), cmdsn=_u32(b, 24),
            exp_statsn=_u32(b, 28), immediate=imm,
        )
    if op == Op.SNACK:
        return Snack(itt=itt, kind=f1 & 0x0F)
    raise ProtocolError(
        f"unknown or target-only opcode 0x{op:02x}", RejectReason.COMMAND_NOT_SUPPORTED,
        bhs=bytes(b), fatal=False,
    )


_HDR = struct.Struct(">BBBBB3s8sIIIIIIII")  # 48 bytes


def _bhs(op: int, flags: int, b2: int, b3: int, dlen: int, lun_or: bytes, itt: int,
         w20: int, w24: int, w28: int, w32: int, w36: int, w40: int, w44: int) -> bytes:
    return _HDR.pack(op, flags, b2, b3, 0, dlen.to_bytes(3, "big"), lun_or, itt,
                     w20, w24, w28, w32, w36, w40, w44)


def _lun(lun: int) -> bytes:
    return lun.to_bytes(8, "big")


def data_in_header(itt: int, lun: int, length: int, datasn: int, offset: int, exp_cmdsn: int,
                   max_cmdsn: int, *, final: bool, status_present: bool, status: int = 0,
                   statsn: int = 0, overflow: bool = False, underflow: bool = False,
                   residual: int = 0) -> bytes:
    """The BHS of a Data-In PDU (the hot path of reads: no intermediate object)."""
    flags = ((0x80 if final else 0) | (0x04 if overflow else 0) | (0x02 if underflow else 0)
             | (0x01 if status_present else 0))
    return _HDR.pack(Op.DATA_IN, flags, 0, status if status_present else 0, 0,
                     length.to_bytes(3, "big"), lun.to_bytes(8, "big"), itt, RESERVED_TAG,
                     statsn if status_present else 0, exp_cmdsn, max_cmdsn, datasn, offset,
                     residual)


def encode_pdu(pdu: TargetPdu | InitiatorPdu) -> tuple[bytes, bytes | memoryview]:
    """The BHS and data segment of a PDU (framing/digests: `frame_bytes`)."""
    t = type(pdu)
    if t is DataIn:
        p: DataIn = pdu  # type: ignore[assignment]
        return data_in_header(
            p.itt, p.lun, len(p.data), p.datasn, p.offset, p.exp_cmdsn, p.max_cmdsn,
            final=p.final, status_present=p.status_present, status=p.status, statsn=p.statsn,
            overflow=p.overflow, underflow=p.underflow, residual=p.residual), p.data
    if t is ScsiResponse:
        p2: ScsiResponse = pdu  # type: ignore[assignment]
        flags = 0x80 | (0x04 if p2.overflow else 0) | (0x02 if p2.underflow else 0)
        data = (len(p2.sense).to_bytes(2, "big") + p2.sense) if p2.sense else b""
        return _bhs(Op.SCSI_RSP, flags, p2.response, p2.status, len(data), bytes(8), p2.itt,
                    0, p2.statsn, p2.exp_cmdsn, p2.max_cmdsn, p2.exp_datasn, 0,
                    p2.residual), data
    if t is R2T:
        p3: R2T = pdu  # type: ignore[assignment]
        return _bhs(Op.R2T, 0x80, 0, 0, 0, _lun(p3.lun), p3.itt, p3.ttt, p3.statsn,
                    p3.exp_cmdsn, p3.max_cmdsn, p3.r2tsn, p3.offset, p3.length), b""
    if t is NopIn:
        p4: NopIn = pdu  # type: ignore[assignment]
        return _bhs(Op.NOP_IN, 0x80, 0, 0, len(p4.data), _lun(p4.lun), p4.itt, p4.ttt,
                    p4.statsn, p4.exp_cmdsn, p4.max_cmdsn, 0, 0, 0), p4.data
    if t is LoginResponse:
        p5: LoginResponse = pdu  # type: ignore[assignment]
        flags = ((0x80 if p5.transit else 0) | (0x40 if p5.cont else 0)
                 | (p5.csg << 2) | (p5.nsg if p5.transit else 0))
        lun_field = bytes(p5.isid[:6]).ljust(6, b"\0") + p5.tsih.to_bytes(2, "big")
        w36 = (p5.status_class << 24) | (p5.status_detail << 16)
        return _bhs(Op.LOGIN_RSP, flags, 0, 0, len(p5.data), lun_field, p5.itt, 0, p5.statsn,
                    p5.exp_cmdsn, p5.max_cmdsn, w36, 0, 0), p5.data
    if t is TextResponse:
        p6: TextResponse = pdu  # type: ignore[assignment]
        flags = (0x80 if p6.final else 0) | (0x40 if p6.cont else 0)
        return _bhs(Op.TEXT_RSP, flags, 0, 0, len(p6.data), bytes(8), p6.itt, p6.ttt,
                    p6.statsn, p6.exp_cmdsn, p6.max_cmdsn, 0, 0, 0), p6.data
    if t is TaskManagementResponse:
        p7: TaskManagementResponse = pdu  # type: ignore[assignment]
        return _bhs(Op.TMF_RSP, 0x80, p7.response, 0, 0, bytes(8), p7.itt, 0, p7.statsn,
                    p7.exp_cmdsn, p7.max_cmdsn, 0, 0, 0), b""
    if t is LogoutResponse:
        p8: LogoutResponse = pdu  # type: ignore[assignment]
        w40 = (p8.time2wait << 16) | p8.time2retain
        return _bhs(Op.LOGOUT_RSP, 0x80, p8.response, 0, 0, bytes(8), p8.itt, 0, p8.statsn,
                    p8.exp_cmdsn, p8.max_cmdsn, 0, w40, 0), b""
    if t is Reject:
        p9: Reject = pdu  # type: ignore[assignment]
        data = p9.bhs[:BHS_LEN]
        return _bhs(Op.REJECT, 0x80, p9.reason, 0, len(data), bytes(8), RESERVED_TAG, 0,
                    p9.statsn, p9.exp_cmdsn, p9.max_cmdsn, 0, 0, 0), data
    if t is AsyncMessage:
        pa: AsyncMessage = pdu  # type: ignore[assignment]
        w36 = (pa.event << 24) | 0
        w40 = (pa.param1 << 16) | pa.param2
        w44 = pa.param3 << 16
        return _bhs(Op.ASYNC, 0x80, 0, 0, len(pa.data), _lun(pa.lun), RESERVED_TAG, 0,
                    pa.statsn, pa.exp_cmdsn, pa.max_cmdsn, w36, w40, w44), pa.data
    return _encode_initiator(pdu)  # type: ignore[arg-type]


def _encode_initiator(pdu: InitiatorPdu) -> tuple[bytes, bytes]:
    """Encoders for initiator PDUs (used by tests and tools that act as initiators)."""
    if isinstance(pdu, ScsiCommand):
        flags = ((0x80 if pdu.final else 0) | (0x40 if pdu.read else 0)
                 | (0x20 if pdu.write else 0) | pdu.attr)
        cdb = pdu.cdb.ljust(16, b"\0")
        hdr = _HDR.pack(Op.SCSI_CMD | (0x40 if pdu.immediate else 0), flags, 0, 0, 0,
                        len(pdu.data).to_bytes(3, "big"), _lun(pdu.lun), pdu.itt, pdu.edtl,
                        pdu.cmdsn, pdu.exp_statsn, *struct.unpack(">IIII", cdb))
        return hdr, pdu.data
    if isinstance(pdu, DataOut):
        return _bhs(Op.DATA_OUT, 0x80 if pdu.final else 0, 0, 0, len(pdu.data), _lun(pdu.lun),
                    pdu.itt, pdu.ttt, 0, pdu.exp_statsn, 0, pdu.datasn, pdu.offset, 0), pdu.data
    if isinstance(pdu, NopOut):
        return _bhs(Op.NOP_OUT | (0x40 if pdu.immediate else 0), 0x80, 0, 0, len(pdu.data),
                    _lun(pdu.lun), pdu.itt, pdu.ttt, pdu.cmdsn, pdu.exp_statsn, 0, 0, 0,
                    0), pdu.data
    if isinstance(pdu, LoginRequest):
        flags = ((0x80 if pdu.transit else 0) | (0x40 if pdu.cont else 0) | (pdu.csg << 2)
                 | pdu.nsg)
        lun_field = pdu.isid[:6].ljust(6, b"\0") + pdu.tsih.to_bytes(2, "big")
        return _bhs(Op.LOGIN_REQ | 0x40, flags, pdu.version_max, pdu.version_min,
                    len(pdu.data), lun_field, pdu.itt, pdu.cid << 16, pdu.cmdsn,
                    pdu.exp_statsn, 0, 0, 0, 0), pdu.data
    if isinstance(pdu, TextRequest):
        flags = (0x80 if pdu.final else 0) | (0x40 if pdu.cont else 0)
        return _bhs(Op.TEXT_REQ | (0x40 if pdu.immediate else 0), flags, 0, 0, len(pdu.data),
                    _lun(pdu.lun), pdu.itt, pdu.ttt, pdu.cmdsn, pdu.exp_statsn, 0, 0, 0,
                    0), pdu.data
    if isinstance(pdu, TaskManagementRequest):
        return _bhs(Op.TMF_REQ | (0x40 if pdu.immediate else 0), 0x80 | pdu.function, 0, 0, 0,
                    _lun(pdu.lun), pdu.itt, pdu.ref_itt, pdu.cmdsn, pdu.exp_statsn,
                    pdu.ref_cmdsn, 0, 0, 0), b""
    if isinstance(pdu, LogoutRequest):
        return _bhs(Op.LOGOUT_REQ | (0x40 if pdu.immediate else 0), 0x80 | pdu.reason, 0, 0, 0,
                    bytes(8), pdu.itt, pdu.cid << 16, pdu.cmdsn, pdu.exp_statsn, 0, 0, 0,
                    0), b""
    raise TypeError(f"cannot encode {type(pdu).__name__}")
