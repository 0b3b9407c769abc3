"""Persistent reservations of one logical unit (SPC-4 §5.12, PR IN/OUT), sans-IO.

Owns registrations (reservation key per I_T nexus port), the reservation holder
and type, the PRgeneration counter, and the access rule that decides whether a
command from a nexus conflicts. Registrations live in memory: they survive
session reinstatement and LUN resets but not a restart (PTPL_C = 0).
"""

from __future__ import annotations

from dataclasses import dataclass

from obdfuse.iscsi import sense as S
from obdfuse.iscsi.sense import ScsiError, illegal

WRITE_EXCLUSIVE = 1
EXCLUSIVE_ACCESS = 3
WRITE_EXCLUSIVE_REGISTRANTS_ONLY = 5
EXCLUSIVE_ACCESS_REGISTRANTS_ONLY = 6
WRITE_EXCLUSIVE_ALL_REGISTRANTS = 7
EXCLUSIVE_ACCESS_ALL_REGISTRANTS = 8
TYPES = {1, 3, 5, 6, 7, 8}
_ALL_REGISTRANTS = {7, 8}
_REGISTRANTS_MAY_ACCESS = {5, 6, 7, 8}
_EXCLUSIVE_ACCESS = {3, 6, 8}

INVALID_RELEASE = (0x26, 0x04)
RESERVATIONS_PREEMPTED = (0x2A, 0x03)
RESERVATIONS_RELEASED = (0x2A, 0x04)
REGISTRATIONS_PREEMPTED = (0x2A, 0x05)

PARAMETER_LIST_LEN = 24


class Conflict(ScsiError):
    """RESERVATION CONFLICT status (no sense data)."""

    def __init__(self) -> None:
        super().__init__(S.NO_SENSE, (0, 0), status=S.RESERVATION_CONFLICT)


def port_of(nexus: str) -> str:
    """The I_T nexus identity without the session number (initiator name + ISID)."""
    return nexus.split("#", 1)[0]


@dataclass
class Reservation:
    holder: str  # the port that reserved (all-registrants types: any registrant holds it)
    type: int


class PersistentReservations:
    """Registrations and the persistent reservation of one LU."""

    def __init__(self) -> None:
        self.keys: dict[str, int] = {}
        self.reservation: Reservation | None = None
        self.generation = 0
        self.notices: list[tuple[str, tuple[int, int]]] = []  # (port, UA) to deliver

    # ------------------------------------------------------------ access

    def is_holder(self, port: str) -> bool:
        r = self.reservation
        if r is None:
            return False
        if r.type in _ALL_REGISTRANTS:
            return port in self.keys
        return r.holder == port

    def conflicts(self, nexus: str, *, writes: bool) -> bool:
        """Whether a command (medium access; `writes` if it modifies) must be refused."""
        r = self.reservation
        if r is None:
            return False
        port = port_of(nexus)
        if self.is_holder(port):
            return False
        if r.type in _REGISTRANTS_MAY_ACCESS and port in self.keys:
            return False
        return writes or r.type in _EXCLUSIVE_ACCESS

    # ------------------------------------------------------------ PR IN

    def read_keys(self) -> bytes:
        body = b"".join(k.to_bytes(8, "big") for k in self.keys.values())
        return self.generation.to_bytes(4, "big") + len(body).to_bytes(4, "big") + body

    def read_reservation(self) -> bytes:
        r = self.reservation
        head = self.generation.to_bytes(4, "big")
        if r is None:
            return head + bytes(4)
        key = 0 if r.type in _ALL_REGISTRANTS else self.keys.get(r.holder, 0)
        body = key.to_bytes(8, "big") + bytes(5) + bytes([r.type & 0x0F]) + bytes(2)
        return head + len(body).to_bytes(4, "big") + body

    @staticmethod
    def report_capabilities() -> bytes:
        # TMV with every type supported; no SPEC_I_PT, ALL_TG_PT or persistence.
        return bytes([0, 8, 0x00, 0x80, 0xEA, 0x01, 0, 0])

    def read_full_status(self) -> bytes:
        body = b""
        for port, key in self.keys.items():
            name = port.split(",i,", 1)[0].encode() + b"\0"
            name += b"\0" * (-len(name) % 4)
            transport_id = bytes([0x05, 0]) + len(name).to_bytes(2, "big") + name
            holder = self.is_holder(port)
            r = self.reservation
            body += key.to_bytes(8, "big") + bytes(4)
            body += bytes([0x01 if holder else 0, (r.type & 0x0F) if (holder and r) else 0])
            body += bytes(4) + (1).to_bytes(2, "big") + len(transport_id).to_bytes(4, "big")
            body += transport_id
        return self.generation.to_bytes(4, "big") + len(body).to_bytes(4, "big") + body

    # ------------------------------------------------------------ PR OUT

    def out(self, nexus: str, action: int, scope_type: int, params: bytes) -> None:
        """Apply one PERSISTENT RESERVE OUT; raises ScsiError/Conflict."""
        if len(params) != PARAMETER_LIST_LEN:
            raise ScsiError(S.ILLEGAL_REQUEST, S.PARAMETER_LIST_LENGTH_ERROR)
        key = int.from_bytes(params[0:8], "big")
        sa_key = int.from_bytes(params[8:16], "big")
        flags = params[20]
        if flags & 0x0D:  # SPEC_I_PT, ALL_TG_PT... and APTPL are not supported
            raise illegal(S.INVALID_FIELD_IN_PARAMETER_LIST)
        port = port_of(nexus)
        if action in (0, 6):
            self._register(port, key, sa_key, ignore=action == 6)
            return
        if action == 7:  # REGISTER AND MOVE
            raise illegal()
        if port not in self.keys or self.keys[port] != key:
            raise Conflict()
        ptype = scope_type & 0x0F
        if action == 1:
            self._reserve(port, scope_type, ptype)
        elif action == 2:
            self._release(port, scope_type, ptype)
        elif action == 3:
            self._notify(set(self.keys) - {port}, RESERVATIONS_PREEMPTED)
            self.keys.clear()
            self.reservation = None
            self.generation += 1
        elif action in (4, 5):
            self._preempt(port, sa_key, scope_type, ptype)
        else:
            raise illegal()

    def _register(self, port: str, key: int, sa_key: int, *, ignore: bool) -> None:
        current = self.keys.get(port)
        if current is None and not ignore and key != 0:
            raise Conflict()
        if current is not None and not ignore and key != current:
            raise Conflict()
        if sa_key == 0:
            if current is not None:
                self._unregister(port)
        else:
            self.keys[port] = sa_key
        self.generation += 1

    def _unregister(self, port: str) -> None:
        del self.keys[port]
        r = self.reservation
        if r is None:
            return
        if r.type in _ALL_REGISTRANTS:
            if not self.keys:
                self.reservation = None
        elif r.holder == port:
            self.reservation = None
            if r.type in (WRITE_EXCLUSIVE_REGISTRANTS_ONLY, EXCLUSIVE_ACCESS_REGISTRANTS_ONLY):
                self._notify(set(self.keys), RESERVATIONS_RELEASED)

    def _reserve(self, port: str, scope_type: int, ptype: int) -> None:
        if scope_type & 0xF0 or ptype not in TYPES:
            raise illegal()
        r = self.reservation
        if r is None:
            self.reservation = Reservation(port, ptype)
        elif not (self.is_holder(port) and r.type == ptype):
            raise Conflict()

    def _release(self, port: str, scope_type: int, ptype: int) -> None:
        r = self.reservation
        if r is None or not self.is_holder(port):
            return
        if scope_type & 0xF0 or r.type != ptype:
            raise illegal(INVALID_RELEASE)
        self.reservation = None
        if r.type in (5, 6, 7, 8):
            self._notify(set(self.keys) - {port}, RESERVATIONS_RELEASED)

    def _preempt(self, port: str, sa_key: int, scope_type: int, ptype: int) -> None:
        r = self.reservation
        if scope_type & 0xF0 or ptype not in TYPES:
            raise illegal()
        if r is not None and r.type in _ALL_REGISTRANTS:
            if sa_key == 0:
                victims = set(self.keys) - {port}
                self.reservation = Reservation(port, ptype)
            else:
                victims = {p for p, k in self.keys.items() if k == sa_key}
        else:
            if sa_key == 0:
                raise illegal(S.INVALID_FIELD_IN_PARAMETER_LIST)
            victims = {p for p, k in self.keys.items() if k == sa_key}
            if r is not None and self.keys.get(r.holder) == sa_key:
                self.reservation = Reservation(port, ptype)
            elif not victims:
                raise Conflict()
        for victim in victims:
            if victim != port or sa_key != self.keys.get(port):
                self.keys.pop(victim, None)
        self._notify(victims - {port}, REGISTRATIONS_PREEMPTED)
        self.generation += 1

    def _notify(self, ports: set[str], code: tuple[int, int]) -> None:
        self.notices += [(p, code) for p in ports]
