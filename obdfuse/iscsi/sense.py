"""SCSI status codes, sense keys and sense data (SPC-4 §4.5): fixed and descriptor formats."""

from __future__ import annotations

from dataclasses import dataclass

GOOD = 0x00
CHECK_CONDITION = 0x02
CONDITION_MET = 0x04
BUSY = 0x08
RESERVATION_CONFLICT = 0x18
TASK_ABORTED = 0x40

NO_SENSE = 0x0
NOT_READY = 0x2
MEDIUM_ERROR = 0x3
HARDWARE_ERROR = 0x4
ILLEGAL_REQUEST = 0x5
UNIT_ATTENTION = 0x6
DATA_PROTECT = 0x7
ABORTED_COMMAND = 0xB
MISCOMPARE = 0xE

# (ASC, ASCQ) pairs used by the target.
INVALID_OPCODE = (0x20, 0x00)
LBA_OUT_OF_RANGE = (0x21, 0x00)
INVALID_FIELD_IN_CDB = (0x24, 0x00)
PARAMETER_LIST_LENGTH_ERROR = (0x1A, 0x00)
INVALID_FIELD_IN_PARAMETER_LIST = (0x26, 0x00)
WRITE_PROTECTED = (0x27, 0x00)
UNRECOVERED_READ_ERROR = (0x11, 0x00)
WRITE_ERROR = (0x0C, 0x00)
MISCOMPARE_DURING_VERIFY = (0x1D, 0x00)
POWER_ON_RESET = (0x29, 0x00)
TARGET_RESET_OCCURRED = (0x29, 0x02)
LUN_RESET_OCCURRED = (0x29, 0x03)
MODE_PARAMETERS_CHANGED = (0x2A, 0x01)
RESERVATIONS_RELEASED = (0x2A, 0x04)
SAVING_PARAMETERS_UNSUPPORTED = (0x39, 0x00)
LU_COMMUNICATION_FAILURE = (0x08, 0x00)
INTERNAL_TARGET_FAILURE = (0x44, 0x00)


@dataclass(frozen=True, slots=True)
class Sense:
    """A sense key with its additional sense code and optional INFORMATION field."""

    key: int
    asc: int
    ascq: int
    information: int | None = None
    field: int | None = None  # CDB byte an ILLEGAL REQUEST points at (sense-key specific)

    def _sense_key_specific(self) -> bytes:
        assert self.field is not None
        return bytes([0x80 | 0x40]) + self.field.to_bytes(2, "big")  # SKSV, C/D = CDB

    def encode(self, descriptor: bool) -> bytes:
        """Fixed (70h) or descriptor (72h) format sense data."""
        if descriptor:
            body = b""
            if self.information is not None:
                body = bytes([0x00, 0x0A, 0x80, 0]) + self.information.to_bytes(8, "big")
            if self.field is not None:
                body += bytes([0x02, 0x06, 0, 0]) + self._sense_key_specific() + b"\0"
            return bytes([0x72, self.key, self.asc, self.ascq, 0, 0, 0, len(body)]) + body
        out = bytearray(18)
        out[0] = 0x70
        if self.information is not None:
            out[0] |= 0x80
            out[3:7] = (self.information & 0xFFFFFFFF).to_bytes(4, "big")
        out[2] = self.key
        out[7] = 10
        out[12] = self.asc
        out[13] = self.ascq
        if self.field is not None:
            out[15:18] = self._sense_key_specific()
        return bytes(out)


class ScsiError(Exception):
    """A command failed with CHECK CONDITION and this sense (or another status)."""

    def __init__(self, key: int, code: tuple[int, int], *, information: int | None = None,
                 status: int = CHECK_CONDITION, field: int | None = None) -> None:
        super().__init__(f"sense {key:x}/{code[0]:02x}/{code[1]:02x}")
        self.sense = Sense(key, code[0], code[1], information, field)
        self.status = status


def illegal(code: tuple[int, int] = INVALID_FIELD_IN_CDB, *, field: int | None = None
            ) -> ScsiError:
    """ILLEGAL REQUEST with the given ASC/ASCQ (and the offending CDB byte, if known)."""
    return ScsiError(ILLEGAL_REQUEST, code, field=field)
