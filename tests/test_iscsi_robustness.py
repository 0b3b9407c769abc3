"""Hostile and malformed input against the real target over TCP: it must answer
with Reject or close the connection, never crash, and keep its memory bounded."""

from __future__ import annotations

import socket
import struct
import subprocess
import time

import pytest

from obdfuse.iscsi import pdu as W
from obdfuse.iscsi.params import encode_text
from tests.support.iscsi import OBDFUSE_IQN, ObdfuseTarget

ISID = bytes.fromhex("400001370000")


class RawInitiator:
    """A minimal initiator on a plain socket, for sending broken PDUs."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        self.reader = W.FrameReader(max_data=1 << 20)
        self.cmdsn = 1
        self.itt = 1

    def close(self) -> None:
        self.sock.close()

    def send(self, pdu) -> None:
        bhs, data = W.encode_pdu(pdu)
        self.sock.sendall(b"".join(bytes(p) for p in W.frame_bytes(bhs, data)))

    def recv(self, timeout: float = 5) -> W.Frame | None:
        """The next PDU, or None when the target closed the connection."""
        self.sock.settimeout(timeout)
        while True:
            frame = self.reader.next_frame()
            if frame is not None:
                return frame
            try:
                chunk = self.sock.recv(65536)
            except ConnectionResetError:
                return None
            if not chunk:
                return None
            self.reader.feed(chunk)

    def login(self) -> None:
        keys = [("InitiatorName", "iqn.2024-01.test:raw"), ("TargetName", OBDFUSE_IQN),
                ("SessionType", "Normal"), ("HeaderDigest", "None"), ("DataDigest", "None"),
                ("MaxRecvDataSegmentLength", "65536")]
        self.send(W.LoginRequest(itt=0, transit=True, cont=False, csg=1, nsg=3, version_max=0,
                                 version_min=0, isid=ISID, tsih=0, cid=0, cmdsn=self.cmdsn,
                                 exp_statsn=0, data=encode_text(keys)))
        rsp = self.recv()
        assert rsp is not None and rsp.opcode == W.Op.LOGIN_RSP
        assert rsp.bhs[36] == 0, f"login failed: class {rsp.bhs[36]} detail {rsp.bhs[37]}"
        assert rsp.bhs[1] & 0x83 == 0x83  # T bit, NSG full feature

    def nop(self) -> W.Frame | None:
        self.itt += 1
        self.send(W.NopOut(itt=self.itt, ttt=W.RESERVED_TAG, lun=0, cmdsn=self.cmdsn,
                           exp_statsn=0, immediate=True, data=b"ping"))
        return self.recv()

    def command(self, cdb: bytes, *, edtl: int = 0, read: bool = False, write: bool = False,
                data: bytes = b"", final: bool = True) -> int:
        self.itt += 1
        self.send(W.ScsiCommand(itt=self.itt, lun=0, edtl=edtl, cmdsn=self.cmdsn, exp_statsn=0,
                                cdb=cdb, read=read, write=write, final=final, immediate=False,
                                data=data))
        self.cmdsn += 1
        return self.itt


def raw_bhs(opcode: int, *, dlen: int = 0, flags: int = 0x80, ahs: int = 0) -> bytes:
    bhs = bytearray(48)
    bhs[0], bhs[1], bhs[4] = opcode, flags, ahs
    bhs[5:8] = dlen.to_bytes(3, "big")
    return bytes(bhs)


@pytest.fixture
def target(tmp_path):
    disk = tmp_path / "disk.img"
    with open(disk, "wb") as f:
        f.truncate(16 << 20)
    with ObdfuseTarget("--raw", "--writable", str(disk), log=tmp_path / "target.log") as t:
        yield t
        assert t.proc is not None and t.proc.poll() is None, "the target died"


def still_serving(t: ObdfuseTarget) -> None:
    out = subprocess.run(["iscsi-inq", t.url], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0 and "DIRECT_ACCESS" in out.stdout, out.stderr


def test_garbage_before_login_closes_connection(target):
    ini = RawInitiator(target.port)
    ini.sock.sendall(b"\xff" * 48 + b"GET / HTTP/1.1\r\n\r\n")
    frame = ini.recv()
    assert frame is None or frame.opcode == W.Op.REJECT
    ini.close()
    still_serving(target)


def test_oversized_data_segment_is_rejected_without_allocation(target):
    before = target.rss_kib()
    socks = []
    for _ in range(20):
        ini = RawInitiator(target.port)
        ini.login()
        ini.sock.sendall(raw_bhs(W.Op.SCSI_CMD, dlen=0xFFFFFF) + b"\0" * 65536)
        frame = ini.recv()
        assert frame is not None and frame.opcode == W.Op.REJECT
        assert frame.bhs[2] == W.RejectReason.PROTOCOL_ERROR
        assert ini.recv() is None  # framing is lost: the connection is closed
        socks.append(ini)
    for ini in socks:
        ini.close()
    assert target.rss_kib() - before < 64 * 1024
    still_serving(target)


def test_oversized_login_text_is_refused(target):
    ini = RawInitiator(target.port)
    ini.sock.sendall(raw_bhs(W.Op.LOGIN_REQ | 0x40, dlen=200_000, flags=0x87)
                     + b"A=" + b"x" * 50_000)
    frame = ini.recv()
    assert frame is None or frame.opcode == W.Op.REJECT
    ini.close()
    still_serving(target)


def test_unknown_opcode_gets_reject_and_connection_survives(target):
    ini = RawInitiator(target.port)
    ini.login()
    ini.sock.sendall(raw_bhs(0x1C))  # not an initiator opcode
    frame = ini.recv()
    assert frame is not None and frame.opcode == W.Op.REJECT
    assert frame.bhs[2] == W.RejectReason.COMMAND_NOT_SUPPORTED
    assert frame.data[:1] == bytes([0x1C])  # the rejected header is echoed
    pong = ini.nop()
    assert pong is not None and pong.opcode == W.Op.NOP_IN and pong.data == b"ping"
    ini.close()


def test_ahs_is_skipped(target):
    ini = RawInitiator(target.port)
    ini.login()
    # TEST UNIT READY carrying a 4-byte (extended CDB) AHS.
    bhs = bytearray(raw_bhs(W.Op.SCSI_CMD, flags=0x80, ahs=1))
    bhs[16:20] = (77).to_bytes(4, "big")
    bhs[24:28] = (1).to_bytes(4, "big")
    ini.sock.sendall(bytes(bhs) + b"\0\x04\x01\0")
    frame = ini.recv()
    assert frame is not None and frame.opcode == W.Op.SCSI_RSP
    assert frame.bhs[3] == 0 and int.from_bytes(frame.bhs[16:20], "big") == 77


def test_huge_write_is_refused_before_buffering(target):
    ini = RawInitiator(target.port)
    ini.login()
    # 20000 blocks: inside the 16 MiB disk, above the 8 MiB transfer limit of VPD B0h.
    cdb = bytes([0x2A, 0, 0, 0, 0, 0, 0, 0x4E, 0x20, 0]).ljust(16, b"\0")
    itt = ini.command(cdb, edtl=0xFFFFFFFF, write=True)
    frame = ini.recv()
    assert frame is not None and frame.opcode == W.Op.SCSI_RSP, frame
    assert int.from_bytes(frame.bhs[16:20], "big") == itt
    assert frame.bhs[3] == 0x02  # CHECK CONDITION, no R2T for 4 GiB
    sense = frame.data[2:]
    assert sense[2] & 0x0F == 0x05 and sense[12] == 0x24
    ini.close()


def test_data_out_for_unknown_task_is_ignored_and_bad_ttt_rejected(target):
    ini = RawInitiator(target.port)
    ini.login()
    ini.send(W.DataOut(itt=999, ttt=W.RESERVED_TAG, lun=0, final=True, exp_statsn=0, datasn=0,
                       offset=0, data=b"x" * 512))
    pong = ini.nop()
    assert pong is not None and pong.opcode == W.Op.NOP_IN
    # A write waiting for an R2T, then Data-Out with a transfer tag never issued.
    cdb = bytes([0x2A, 0, 0, 0, 0, 0, 0, 0, 8, 0]).ljust(16, b"\0")
    itt = ini.command(cdb, edtl=4096, write=True)
    r2t = ini.recv()
    assert r2t is not None and r2t.opcode == W.Op.R2T
    ini.send(W.DataOut(itt=itt, ttt=0x12345, lun=0, final=True, exp_statsn=0, datasn=0,
                       offset=0, data=b"y" * 4096))
    frame = ini.recv()
    assert frame is not None and frame.opcode == W.Op.REJECT
    ini.close()


def test_snack_is_rejected_at_error_recovery_level_0(target):
    ini = RawInitiator(target.port)
    ini.login()
    ini.sock.sendall(raw_bhs(W.Op.SNACK))
    frame = ini.recv()
    assert frame is not None and frame.opcode == W.Op.REJECT
    assert ini.nop() is not None
    ini.close()


def test_login_pdu_flood_on_one_connection_is_cut_off(target):
    ini = RawInitiator(target.port)
    n_answers = 0
    for _ in range(40):
        try:
            ini.send(W.LoginRequest(itt=0, transit=False, cont=False, csg=1, nsg=0,
                                    version_max=0, version_min=0, isid=ISID, tsih=0, cid=0,
                                    cmdsn=1, exp_statsn=0,
                                    data=encode_text([("InitiatorName", "iqn.x:y"),
                                                      ("TargetName", OBDFUSE_IQN)])))
        except OSError:
            break
    while ini.recv() is not None:
        n_answers += 1
    assert n_answers <= 17  # at most 16 login PDUs, then a failure status
    ini.close()
    still_serving(target)


def test_connection_flood_stays_bounded(target):
    before = target.rss_kib()
    socks = []
    for _ in range(150):
        try:
            s = socket.create_connection(("127.0.0.1", target.port), timeout=5)
            s.sendall(raw_bhs(W.Op.LOGIN_REQ | 0x40, dlen=8000, flags=0x87)[:40])
            socks.append(s)
        except OSError:
            break
    time.sleep(0.5)
    grown = target.rss_kib() - before
    # A real initiator gets in while the flood is still connected: idle logins are
    # evicted oldest-first instead of holding every slot until their deadline.
    t0 = time.monotonic()
    still_serving(target)
    assert time.monotonic() - t0 < 5
    for s in socks:
        s.close()
    assert grown < 64 * 1024
    still_serving(target)


def test_session_reinstatement_replaces_old_session(target):
    first = RawInitiator(target.port)
    first.login()
    second = RawInitiator(target.port)
    second.login()  # same InitiatorName and ISID
    assert first.recv(timeout=5) is None  # the old connection is dropped
    pong = second.nop()
    assert pong is not None and pong.opcode == W.Op.NOP_IN
    second.close()
    first.close()


def test_reject_pdu_layout(target):
    ini = RawInitiator(target.port)
    ini.login()
    ini.sock.sendall(raw_bhs(0x3E))
    frame = ini.recv()
    assert frame is not None
    _statsn, exp_cmdsn, max_cmdsn = struct.unpack(">III", frame.bhs[24:36])
    assert frame.bhs[1] == 0x80 and int.from_bytes(frame.bhs[16:20], "big") == W.RESERVED_TAG
    assert max_cmdsn >= exp_cmdsn == 1
    assert len(frame.data) == 48
    ini.close()
