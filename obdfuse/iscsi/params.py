"""Text key=value parameters and their negotiation (RFC 7143 §6, §13), sans-IO.

Owns parsing/encoding of NUL-separated `key=value` text and the target's side of
operational negotiation: list keys take the first value we support, numeric keys
take min or max, boolean keys OR/AND. Only keys the initiator offered are
answered (plus the declarative TargetAlias/TargetAddress/TargetPortalGroupTag
and our MaxRecvDataSegmentLength), because open-iscsi fails a login on any key
it did not ask about.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from obdfuse.iscsi.pdu import ProtocolError

MAX_TEXT = 64 * 1024  # bound on accumulated text across continuation PDUs
MAX_KEYS = 256

# Our fixed answers / preferences (the notes: open-iscsi rejects other values).
TARGET_MRDSL = 262144
TARGET_MAX_BURST = 1048576
TARGET_FIRST_BURST = 262144


def parse_text(data: bytes) -> list[tuple[str, str]]:
    """`key=value\\0...` into ordered pairs; raises ProtocolError on garbage."""
    if len(data) > MAX_TEXT:
        raise ProtocolError("text parameters too long")
    pairs: list[tuple[str, str]] = []
    for item in data.split(b"\0"):
        if not item:
            continue
        key, sep, value = item.partition(b"=")
        if not sep or not key or len(key) > 63:
            raise ProtocolError(f"malformed text key {item[:40]!r}", fatal=False)
        try:
            pairs.append((key.decode("ascii"), value.decode("utf-8")))
        except UnicodeDecodeError as exc:
            raise ProtocolError("text parameter is not UTF-8", fatal=False) from exc
        if len(pairs) > MAX_KEYS:
            raise ProtocolError("too many text keys")
    return pairs


def encode_text(pairs: list[tuple[str, str]]) -> bytes:
    """Ordered pairs to `key=value\\0...`."""
    return b"".join(f"{k}={v}".encode() + b"\0" for k, v in pairs)


@dataclass
class SessionParams:
    """Negotiated operational parameters (RFC 7143 defaults until negotiated)."""

    header_digest: bool = False
    data_digest: bool = False
    initial_r2t: bool = True
    immediate_data: bool = True
    max_burst: int = 262144
    first_burst: int = 65536
    # What the initiator can receive from us (its MaxRecvDataSegmentLength).
    initiator_mrdsl: int = 8192
    default_time2wait: int = 2
    default_time2retain: int = 20
    data_pdu_in_order: bool = True
    data_sequence_in_order: bool = True
    session_type: str = "Normal"
    initiator_name: str = ""
    initiator_alias: str = ""
    target_name: str = ""
    declared_mrdsl: bool = False
    offered: set[str] = field(default_factory=set)


_BOOL = {"Yes": True, "No": False}
_NUMERIC_MIN = {"MaxBurstLength": TARGET_MAX_BURST, "FirstBurstLength": TARGET_FIRST_BURST,
                "DefaultTime2Wait": 3600}
_NUMERIC_MAX = {"DefaultTime2Retain": 0}


def _number(key: str, value: str, lo: int, hi: int) -> int:
    try:
        n = int(value, 0)
    except ValueError as exc:
        raise ProtocolError(f"{key}={value!r} is not a number", fatal=False) from exc
    if not lo <= n <= hi:
        raise ProtocolError(f"{key}={n} out of range", fatal=False)
    return n


def negotiate(
    params: SessionParams, pairs: list[tuple[str, str]], *, allow_crc32c: bool = True
) -> list[tuple[str, str]]:
    """Apply the initiator's offers to `params`; return our answers, in offer order.

    Declarative keys (InitiatorName, SessionType, TargetName...) are recorded and
    not answered. Unknown keys answer NotUnderstood (RFC 7143 §6.2).
    """
    answers: list[tuple[str, str]] = []
    for key, value in pairs:
        params.offered.add(key)
        if key in ("InitiatorName", "InitiatorAlias", "SessionType", "TargetName",
                   "AuthMethod", "CHAP_A", "CHAP_N", "CHAP_R", "CHAP_I", "CHAP_C"):
            if key == "InitiatorName":
                params.initiator_name = value
            elif key == "InitiatorAlias":
                params.initiator_alias = value
            elif key == "SessionType":
                if value not in ("Normal", "Discovery"):
                    raise ProtocolError(f"bad SessionType {value!r}", fatal=False)
                params.session_type = value
            elif key == "TargetName":
                params.target_name = value
            continue  # security keys are handled by the login stage machine
        if key in ("HeaderDigest", "DataDigest"):
            supported = {"None", "CRC32C"} if allow_crc32c else {"None"}
            pick = next((c for c in (v.strip() for v in value.split(",")) if c in supported),
                        None)
            if pick is None:
                answers.append((key, "Reject"))
                continue
            setattr(params, "header_digest" if key == "HeaderDigest" else "data_digest",
                    pick == "CRC32C")
            answers.append((key, pick))
        elif key in ("InitialR2T", "ImmediateData", "DataPDUInOrder", "DataSequenceInOrder"):
            if value not in _BOOL:
                answers.append((key, "Reject"))
                continue
            v = _BOOL[value]
            if key == "InitialR2T":
                params.initial_r2t = v or False  # OR with our "No"
                result = params.initial_r2t
            elif key == "ImmediateData":
                params.immediate_data = v and True  # AND with our "Yes"
                result = params.immediate_data
            elif key == "DataPDUInOrder":
                params.data_pdu_in_order = v or True  # OR with our "Yes"
                result = True
            else:
                params.data_sequence_in_order = v or True
                result = True
            answers.append((key, "Yes" if result else "No"))
        elif key in _NUMERIC_MIN:
            n = min(_number(key, value, 0 if key == "DefaultTime2Wait" else 512, 2**24 - 1),
                    _NUMERIC_MIN[key])
            if key == "MaxBurstLength":
                params.max_burst = n
            elif key == "FirstBurstLength":
                params.first_burst = n
            else:
                params.default_time2wait = n
            answers.append((key, str(n)))
        elif key in _NUMERIC_MAX:
            n = max(_number(key, value, 0, 3600), _NUMERIC_MAX[key])
            params.default_time2retain = n
            answers.append((key, str(n)))
        elif key == "MaxRecvDataSegmentLength":
            params.initiator_mrdsl = _number(key, value, 512, 2**24 - 1)
            answers.append((key, str(TARGET_MRDSL)))
            params.declared_mrdsl = True
        elif key == "MaxConnections" or key == "MaxOutstandingR2T":
            _number(key, value, 1, 65535)
            answers.append((key, "1"))
        elif key == "ErrorRecoveryLevel":
            _number(key, value, 0, 2)
            answers.append((key, "0"))
        elif key in ("IFMarker", "OFMarker"):
            answers.append((key, "No"))
        elif key in ("OFMarkInt", "IFMarkInt"):
            answers.append((key, "Reject"))
        elif key.startswith("X-") or key.startswith("X#"):
            answers.append((key, "NotUnderstood"))
        else:
            answers.append((key, "NotUnderstood"))
    # FirstBurstLength may not exceed MaxBurstLength.
    if params.first_burst > params.max_burst:
        params.first_burst = params.max_burst
        answers = [(k, str(params.first_burst) if k == "FirstBurstLength" else v)
                   for k, v in answers]
    return answers


def declare_mrdsl(params: SessionParams) -> list[tuple[str, str]]:
    """Our MaxRecvDataSegmentLength, declared once even if the initiator did not send its own."""
    if params.declared_mrdsl:
        return []
    params.declared_mrdsl = True
    return [("MaxRecvDataSegmentLength", str(TARGET_MRDSL))]

