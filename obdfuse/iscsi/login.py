"""The target's side of the iSCSI login phase (RFC 7143 §6.3, §12.1), sans-IO.

Owns the security/operational stage machine, CHAP (MD5, one-way and mutual),
the login status codes, and the negotiated `SessionParams`. It is fed
`LoginRequest`s and returns `LoginResponse`s; the session turns a successful
final response into full-feature phase.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass

from obdfuse.iscsi import params as P
from obdfuse.iscsi.pdu import LoginRequest, LoginResponse, ProtocolError

SECURITY, OPERATIONAL, FULL_FEATURE = 0, 1, 3
MAX_LOGIN_PDUS = 16
CHAP_MD5 = "5"
CHAP_CHALLENGE_LEN = 16
MAX_CHAP_CHALLENGE = 1024

# Login status (class, detail), RFC 7143 §11.13.5.
SUCCESS = (0, 0)
INITIATOR_ERROR = (2, 0)
AUTH_FAILED = (2, 1)
NOT_AUTHORIZED = (2, 2)
TARGET_NOT_FOUND = (2, 3)
UNSUPPORTED_VERSION = (2, 5)
MISSING_PARAMETER = (2, 7)
SESSION_DOES_NOT_EXIST = (2, 10)
INVALID_DURING_LOGIN = (2, 11)
TARGET_ERROR = (3, 0)


@dataclass(frozen=True)
class ChapCredentials:
    """CHAP secrets: the initiator must prove `user`/`secret`; with `mutual_*` the
    target proves itself back."""

    user: str
    secret: str
    mutual_user: str | None = None
    mutual_secret: str | None = None


class LoginFailed(Exception):
    """The login must end with this status (the session sends it, then closes)."""

    def __init__(self, status: tuple[int, int], message: str) -> None:
        super().__init__(message)
        self.status = status


def chap_response(ident: int, secret: bytes, challenge: bytes) -> bytes:
    """CHAP MD5 response: MD5(identifier || secret || challenge) (RFC 1994)."""
    return hashlib.md5(bytes([ident]) + secret + challenge).digest()


def _hex(value: str) -> bytes:
    v = value.strip()
    if v[:2] not in ("0x", "0X"):
        raise LoginFailed(AUTH_FAILED, "CHAP value is not hex-encoded")
    try:
        return bytes.fromhex(v[2:])
    except ValueError as exc:
        raise LoginFailed(AUTH_FAILED, "CHAP value is not valid hex") from exc


class LoginStage:
    """One connection's login: feed requests, get responses, until `done`."""

    def __init__(self, *, target_name: str, portal_group: int = 1,
                 chap: ChapCredentials | None = None, known_targets: tuple[str, ...] = ()) -> None:
        self.target_name = target_name
        self.known_targets = known_targets or (target_name,)
        self.portal_group = portal_group
        self.chap = chap
        self.params = P.SessionParams()
        self.done = False
        self.authenticated = chap is None
        self.isid = b""
        self.tsih = 0
        self.itt = 0
        self._pdus = 0
        self._text = bytearray()
        self._first = True
        self._sent_tpgt = False
        self._chap_state = "start"
        self._chap_id = 0
        self._chap_challenge = b""

    # ------------------------------------------------------------------ api

    def handle(self, req: LoginRequest, *, statsn: int, exp_cmdsn: int,
               max_cmdsn: int) -> LoginResponse:
        """Process one Login Request; raises LoginFailed with the status to send."""
        self._pdus += 1
        if self._pdus > MAX_LOGIN_PDUS:
            raise LoginFailed(INITIATOR_ERROR, "too many login PDUs")
        if self._first:
            self.isid, self.tsih, self.itt = req.isid, req.tsih, req.itt
            if req.version_min > 0:
                raise LoginFailed(UNSUPPORTED_VERSION, "unsupported iSCSI version")
        elif req.isid != self.isid:
            raise LoginFailed(INITIATOR_ERROR, "ISID changed during login")
        self.itt = req.itt
        if req.csg not in (SECURITY, OPERATIONAL) or (req.transit and req.nsg not in (
                OPERATIONAL, FULL_FEATURE)) or (req.transit and req.nsg <= req.csg):
            raise LoginFailed(INITIATOR_ERROR, "invalid login stage transition")

        def reply(data: bytes = b"", *, transit: bool = False, nsg: int = 0,
                  cont: bool = False) -> LoginResponse:
            return LoginResponse(itt=req.itt, transit=transit, csg=req.csg, nsg=nsg,
                                 isid=self.isid, tsih=self.tsih, statsn=statsn,
                                 exp_cmdsn=exp_cmdsn, max_cmdsn=max_cmdsn, cont=cont, data=data)

        if len(self._text) + len(req.data) > P.MAX_TEXT:
            raise LoginFailed(INITIATOR_ERROR, "login text too long")
        self._text += req.data
        if req.cont:
            return reply()  # more text follows; acknowledge with an empty response
        text, self._text = bytes(self._text), bytearray()
        try:
            pairs = P.parse_text(text)
        except ProtocolError as exc:
            raise LoginFailed(INITIATOR_ERROR, str(exc)) from exc
        keys = dict(pairs)
        answers: list[tuple[str, str]] = []
        if self._first:
            self._first = False
            self._check_names(keys)
        if req.csg == SECURITY:
            answers += self._security(keys, pairs)
            rest = [(k, v) for k, v in pairs if k != "AuthMethod" and not k.startswith("CHAP_")]
            answers += self._negotiate(rest)
        else:
            if not self.authenticated:
                raise LoginFailed(AUTH_FAILED, "authentication required")
            answers += self._negotiate(pairs)
        transit = req.transit
        if transit and req.csg == SECURITY and not self.authenticated:
            transit = False  # CHAP is still going on
            if self._chap_state == "start":
                raise LoginFailed(AUTH_FAILED, "authentication required")
        if transit and req.nsg == FULL_FEATURE:
            if self.params.session_type == "Normal":
                answers += P.declare_mrdsl(self.params)
            self.done = True
        if self.params.session_type == "Normal" and not self._sent_tpgt:
            answers.append(("TargetPortalGroupTag", str(self.portal_group)))
            self._sent_tpgt = True
        return reply(P.encode_text(answers), transit=transit,
                     nsg=req.nsg if transit else 0)

    # ------------------------------------------------------------------ parts

    def _check_names(self, keys: dict[str, str]) -> None:
        if "InitiatorName" not in keys:
            raise LoginFailed(MISSING_PARAMETER, "InitiatorName missing")
        session_type = keys.get("SessionType", "Normal")
        if session_type not in ("Normal", "Discovery"):
            raise LoginFailed(INITIATOR_ERROR, f"bad SessionType {session_type!r}")
        if session_type == "Normal":
            name = keys.get("TargetName")
            if not name:
                raise LoginFailed(MISSING_PARAMETER, "TargetName missing")
            if name not in self.known_targets:
                raise LoginFailed(TARGET_NOT_FOUND, f"no target named {name!r}")

    def _negotiate(self, pairs: list[tuple[str, str]]) -> list[tuple[str, str]]:
        try:
            return P.negotiate(self.params, pairs)
        except ProtocolError as exc:
            raise LoginFailed(INITIATOR_ERROR, str(exc)) from exc

    def _security(self, keys: dict[str, str], pairs) -> list[tuple[str, str]]:
        answers: list[tuple[str, str]] = []
        if "AuthMethod" in keys:
            offered = [m.strip() for m in keys["AuthMethod"].split(",")]
            if self.chap is None:
                pick = "None" if "None" in offered else None
            else:
                pick = "CHAP" if "CHAP" in offered else None
            if pick is None:
                raise LoginFailed(AUTH_FAILED, "no acceptable AuthMethod")
            answers.append(("AuthMethod", pick))
            if pick == "CHAP":
                self._chap_state = "method"
            return answers
        if self.chap is None:
            return answers
        if self._chap_state == "method" and "CHAP_A" in keys:
            algs = [a.strip() for a in keys["CHAP_A"].split(",")]
            if CHAP_MD5 not in algs:
                raise LoginFailed(AUTH_FAILED, "CHAP_A without MD5")
            self._chap_id = secrets.randbelow(256)
            self._chap_challenge = secrets.token_bytes(CHAP_CHALLENGE_LEN)
            self._chap_state = "challenged"
            return [("CHAP_A", CHAP_MD5), ("CHAP_I", str(self._chap_id)),
                    ("CHAP_C", "0x" + self._chap_challenge.hex())]
        if self._chap_state == "challenged" and "CHAP_N" in keys and "CHAP_R" in keys:
            return self._chap_verify(keys)
        raise LoginFailed(AUTH_FAILED, "unexpected CHAP exchange")

    def _chap_verify(self, keys: dict[str, str]) -> list[tuple[str, str]]:
        chap = self.chap
        assert chap is not None
        expected = chap_response(self._chap_id, chap.secret.encode(), self._chap_challenge)
        got = _hex(keys["CHAP_R"])
        if not (hmac.compare_digest(keys["CHAP_N"], chap.user)
                and hmac.compare_digest(got, expected)):
            raise LoginFailed(AUTH_FAILED, "CHAP authentication failed")
        answers: list[tuple[str, str]] = []
        if "CHAP_I" in keys or "CHAP_C" in keys:
            if chap.mutual_user is None or chap.mutual_secret is None:
                raise LoginFailed(AUTH_FAILED, "mutual CHAP requested but not configured")
            try:
                ident = int(keys.get("CHAP_I", ""), 0)
            except ValueError as exc:
                raise LoginFailed(AUTH_FAILED, "bad CHAP_I") from exc
            challenge = _hex(keys.get("CHAP_C", ""))
            if not 0 <= ident <= 255 or not challenge or len(challenge) > MAX_CHAP_CHALLENGE:
                raise LoginFailed(AUTH_FAILED, "bad mutual CHAP challenge")
            if challenge == self._chap_challenge:
                raise LoginFailed(AUTH_FAILED, "reflected CHAP challenge")
            response = chap_response(ident, chap.mutual_secret.encode(), challenge)
            answers += [("CHAP_N", chap.mutual_user), ("CHAP_R", "0x" + response.hex())]
        elif chap.mutual_user is not None:
            raise LoginFailed(AUTH_FAILED, "mutual CHAP required")
        self.authenticated = True
        self._chap_state = "done"
        return answers
