"""The sans-IO iSCSI core driven directly with byte strings: PDU framing and
digests, text negotiation, login and CHAP, and a full session over a real
RawFileDevice (no sockets)."""

from __future__ import annotations

import hashlib
import os

import pytest
import trio

from obdfuse.device import RawFileDevice
from obdfuse.iscsi import pdu as W
from obdfuse.iscsi.login import ChapCredentials, LoginFailed, LoginStage, chap_response
from obdfuse.iscsi.params import SessionParams, encode_text, negotiate, parse_text
from obdfuse.iscsi.scsi import LogicalUnit
from obdfuse.iscsi.sense import ScsiError
from obdfuse.iscsi.session import Connection, TargetConfig

IQN = "iqn.2024-01.io.obdfuse:unit"
ISID = bytes.fromhex("400001370001")

# ------------------------------------------------------------------ framing


def wire(pdu, *, hd: bool = False, dd: bool = False) -> bytes:
    bhs, data = W.encode_pdu(pdu)
    return b"".join(bytes(p) for p in W.frame_bytes(bhs, data, header_digest=hd,
                                                    data_digest=dd))


def test_crc32c_known_vector():
    assert W.crc32c(b"123456789") == 0xE3069283  # RFC 3720 B.4 check value


def test_frame_reader_padding_and_split_delivery():
    cmd = W.ScsiCommand(itt=7, lun=0, edtl=5, cmdsn=1, exp_statsn=0, cdb=b"\x2a" + bytes(15),
                        read=False, write=True, final=True, immediate=False, data=b"hello")
    raw = wire(cmd)
    assert len(raw) == 48 + 8  # 5 data bytes padded to 8
    reader = W.FrameReader(max_data=1024)
    for i in range(len(raw)):  # one byte at a time
        assert reader.next_frame() is None
        reader.feed(raw[i:i + 1])
    frame = reader.next_frame()
    assert frame is not None and frame.data == b"hello"
    assert W.decode_pdu(frame) == cmd


def test_digests_round_trip_and_detect_corruption():
    nop = W.NopOut(itt=1, ttt=W.RESERVED_TAG, lun=0, cmdsn=3, exp_statsn=4, immediate=True,
                   data=b"abc")
    raw = wire(nop, hd=True, dd=True)
    reader = W.FrameReader()
    reader.header_digest = reader.data_digest = True
    reader.feed(raw)
    assert W.decode_pdu(reader.next_frame()) == nop
    bad_header = bytearray(raw)
    bad_header[20] ^= 1
    reader.feed(bytes(bad_header))
    with pytest.raises(W.ProtocolError, match="header digest"):
        reader.next_frame()
    reader = W.FrameReader()
    reader.header_digest = reader.data_digest = True
    bad_data = bytearray(raw)
    bad_data[48 + 4] ^= 1
    reader.feed(bytes(bad_data) + raw)
    with pytest.raises(W.ProtocolError) as exc:
        reader.next_frame()
    assert exc.value.reason == W.RejectReason.DATA_DIGEST and not exc.value.fatal
    assert W.decode_pdu(reader.next_frame()) == nop  # the stream stays in sync


def test_oversized_segment_fails_before_buffering():
    reader = W.FrameReader(max_data=8192)
    bhs = bytearray(48)
    bhs[0] = W.Op.SCSI_CMD
    bhs[5:8] = (8193).to_bytes(3, "big")
    reader.feed(bytes(bhs))
    with pytest.raises(W.ProtocolError, match="exceeds"):
        reader.next_frame()


def test_unknown_opcode_is_a_non_fatal_reject():
    bhs = bytearray(48)
    bhs[0] = 0x1D
    with pytest.raises(W.ProtocolError) as exc:
        W.decode_pdu(W.Frame(bytes(bhs), b""))
    assert exc.value.reason == W.RejectReason.COMMAND_NOT_SUPPORTED and not exc.value.fatal


def test_scsi_response_layout():
    rsp = W.ScsiResponse(itt=9, status=2, statsn=5, exp_cmdsn=6, max_cmdsn=70, underflow=True,
                         residual=512, sense=b"\x70" + bytes(17))
    bhs, data = W.encode_pdu(rsp)
    assert bhs[0] == 0x21 and bhs[1] == 0x82 and bhs[3] == 2
    assert int.from_bytes(bhs[44:48], "big") == 512
    assert data[:2] == b"\x00\x12" and data[2] == 0x70


# ------------------------------------------------------------------ negotiation


def test_parse_text_rejects_garbage():
    assert parse_text(b"A=1\0B=\0") == [("A", "1"), ("B", "")]
    with pytest.raises(W.ProtocolError):
        parse_text(b"novalue\0")


def test_negotiation_follows_rfc_rules():
    p = SessionParams()
    offered = [("HeaderDigest", "None,CRC32C"), ("DataDigest", "CRC32C,None"),
               ("InitialR2T", "No"), ("ImmediateData", "Yes"), ("MaxBurstLength", "262144"),
               ("FirstBurstLength", "65536"), ("MaxRecvDataSegmentLength", "131072"),
               ("MaxOutstandingR2T", "8"), ("MaxConnections", "4"),
               ("ErrorRecoveryLevel", "2"), ("DefaultTime2Wait", "2"),
               ("DefaultTime2Retain", "0"), ("IFMarker", "No"), ("X-com.example.Foo", "1")]
    answers = dict(negotiate(p, offered))
    assert answers["HeaderDigest"] == "None" and answers["DataDigest"] == "CRC32C"
    assert answers["InitialR2T"] == "No" and answers["ImmediateData"] == "Yes"
    assert answers["MaxOutstandingR2T"] == "1" and answers["MaxConnections"] == "1"
    assert answers["ErrorRecoveryLevel"] == "0"
    assert answers["MaxBurstLength"] == "262144" and answers["FirstBurstLength"] == "65536"
    assert answers["X-com.example.Foo"] == "NotUnderstood"
    assert p.initiator_mrdsl == 131072 and p.data_digest and not p.header_digest
    assert not p.initial_r2t
    # Only what was offered is answered (open-iscsi fails on anything else).
    assert set(answers) == {k for k, _ in offered}


# ------------------------------------------------------------------ login / CHAP


def login_request(keys, *, csg=1, nsg=3, transit=True, itt=0):
    return W.LoginRequest(itt=itt, transit=transit, cont=False, csg=csg, nsg=nsg, version_max=0,
                          version_min=0, isid=ISID, tsih=0, cid=0, cmdsn=1, exp_statsn=0,
                          data=encode_text(keys))


def base_keys(name=IQN):
    return [("InitiatorName", "iqn.2024-01.test:ini"), ("SessionType", "Normal"),
            ("TargetName", name)]


def step(stage, keys, **kw):
    rsp = stage.handle(login_request(keys, **kw), statsn=0, exp_cmdsn=1, max_cmdsn=64)
    return rsp, dict(parse_text(rsp.data))


def test_login_without_security_stage():
    stage = LoginStage(target_name=IQN)
    rsp, keys = step(stage, [*base_keys(), ("MaxRecvDataSegmentLength", "262144")])
    assert stage.done and rsp.transit and rsp.nsg == 3
    assert keys["TargetPortalGroupTag"] == "1"
    assert keys["MaxRecvDataSegmentLength"] == "262144"


def test_login_unknown_target_and_missing_name():
    with pytest.raises(LoginFailed) as exc:
        step(LoginStage(target_name=IQN), base_keys("iqn.2024-01.nobody:x"))
    assert exc.value.status == (2, 3)
    with pytest.raises(LoginFailed) as exc:
        step(LoginStage(target_name=IQN), [("TargetName", IQN)])
    assert exc.value.status == (2, 7)


def chap_login(stage, user, secret, *, mutual: tuple[int, bytes] | None = None):
    rsp, keys = step(stage, [*base_keys(), ("AuthMethod", "CHAP,None")], csg=0, nsg=1)
    assert keys["AuthMethod"] == "CHAP" and not rsp.transit
    rsp, keys = step(stage, [("CHAP_A", "5")], csg=0, nsg=1, transit=False)
    ident, challenge = int(keys["CHAP_I"]), bytes.fromhex(keys["CHAP_C"][2:])
    answer = [("CHAP_N", user),
              ("CHAP_R", "0x" + chap_response(ident, secret.encode(), challenge).hex())]
    if mutual:
        answer += [("CHAP_I", str(mutual[0])), ("CHAP_C", "0x" + mutual[1].hex())]
    return step(stage, answer, csg=0, nsg=1)


def test_chap_one_way_good_and_bad():
    creds = ChapCredentials("alice", "a-secret-of-16ch")
    stage = LoginStage(target_name=IQN, chap=creds)
    rsp, _ = chap_login(stage, "alice", "a-secret-of-16ch")
    assert rsp.transit and rsp.nsg == 1 and stage.authenticated
    rsp, _ = step(stage, [("MaxBurstLength", "65536")], csg=1, nsg=3)
    assert stage.done
    for user, secret in (("alice", "wrong-secret-xxx"), ("bob", "a-secret-of-16ch")):
        with pytest.raises(LoginFailed) as exc:
            chap_login(LoginStage(target_name=IQN, chap=creds), user, secret)
        assert exc.value.status == (2, 1)


def test_chap_required_cannot_be_skipped():
    stage = LoginStage(target_name=IQN, chap=ChapCredentials("alice", "a-secret-of-16ch"))
    with pytest.raises(LoginFailed) as exc:
        step(stage, base_keys())  # straight to the operational stage
    assert exc.value.status == (2, 1)
    stage = LoginStage(target_name=IQN, chap=ChapCredentials("alice", "a-secret-of-16ch"))
    with pytest.raises(LoginFailed):
        step(stage, [*base_keys(), ("AuthMethod", "None")], csg=0, nsg=1)


def test_chap_mutual_proves_the_target():
    creds = ChapCredentials("alice", "a-secret-of-16ch", "target", "target-secret-16")
    stage = LoginStage(target_name=IQN, chap=creds)
    challenge = os.urandom(16)
    rsp, keys = chap_login(stage, "alice", "a-secret-of-16ch", mutual=(7, challenge))
    assert rsp.transit and keys["CHAP_N"] == "target"
    expected = hashlib.md5(bytes([7]) + b"target-secret-16" + challenge).hexdigest()
    assert keys["CHAP_R"] == "0x" + expected
    # mutual configured but the initiator does not ask: refused
    with pytest.raises(LoginFailed):
        chap_login(LoginStage(target_name=IQN, chap=creds), "alice", "a-secret-of-16ch")


def test_chap_reflected_challenge_is_refused():
    creds = ChapCredentials("alice", "a-secret-of-16ch", "target", "target-secret-16")
    stage = LoginStage(target_name=IQN, chap=creds)
    step(stage, [*base_keys(), ("AuthMethod", "CHAP")], csg=0, nsg=1)
    _, keys = step(stage, [("CHAP_A", "5")], csg=0, nsg=1, transit=False)
    ident, challenge = int(keys["CHAP_I"]), bytes.fromhex(keys["CHAP_C"][2:])
    answer = [("CHAP_N", "alice"),
              ("CHAP_R", "0x" + chap_response(ident, b"a-secret-of-16ch", challenge).hex()),
              ("CHAP_I", str(ident)), ("CHAP_C", "0x" + challenge.hex())]
    with pytest.raises(LoginFailed):
        step(stage, answer, csg=0, nsg=1)


# ------------------------------------------------------------------ a whole session


class Session:
    """Drives one Connection like an initiator would, executing tasks inline."""

    def __init__(self, lu: LogicalUnit, *, immediate: str = "Yes", initial_r2t: str = "No",
                 mrdsl: int = 8192, burst: int = 65536) -> None:
        self.lu = lu
        self.conn = Connection(TargetConfig(iqn=IQN, luns={0: lu}))
        self.reader = W.FrameReader(max_data=1 << 20)
        self.cmdsn = 1
        self.itt = 0
        keys = [*base_keys(), ("ImmediateData", immediate), ("InitialR2T", initial_r2t),
                ("MaxRecvDataSegmentLength", str(mrdsl)), ("MaxBurstLength", str(burst)),
                ("FirstBurstLength", str(burst))]
        [rsp] = self.feed(login_request(keys))
        assert rsp.bhs[36] == 0 and self.conn.full_feature

    def feed(self, *pdus) -> list[W.Frame]:
        tasks = self.conn.receive_data(b"".join(wire(p) for p in pdus))
        for task in tasks:
            result = trio.run(self.lu.execute, self.conn.nexus, task.cdb, bytes(task.buf),
                              task.edtl if task.write else None)
            self.conn.complete(task, result)
        self.reader.feed(b"".join(bytes(p) for p in self.conn.data_to_send()))
        out = []
        while (frame := self.reader.next_frame()) is not None:
            out.append(frame)
        return out

    def command(self, cdb: bytes, *, edtl=0, read=False, write=False, data=b"", final=True,
                immediate=False, cmdsn=None):
        self.itt += 1
        cmd = W.ScsiCommand(itt=self.itt, lun=0, edtl=edtl,
                            cmdsn=self.cmdsn if cmdsn is None else cmdsn, exp_statsn=0,
                            cdb=cdb.ljust(16, b"\0"), read=read, write=write, final=final,
                            immediate=immediate, data=data)
        if not immediate and cmdsn is None:
            self.cmdsn += 1
        return cmd


def read10(lba, blocks):
    return bytes([0x28, 0]) + lba.to_bytes(4, "big") + bytes([0]) + blocks.to_bytes(2, "big")


def write10(lba, blocks):
    return bytes([0x2A, 0]) + lba.to_bytes(4, "big") + bytes([0]) + blocks.to_bytes(2, "big")


@pytest.fixture
def lu(tmp_path):
    path = tmp_path / "disk.img"
    path.write_bytes(os.urandom(1 << 20))
    dev = RawFileDevice(path, read_only=False)
    yield LogicalUnit(dev)
    trio.run(dev.aclose)


def status_of(frame: W.Frame) -> int:
    return frame.bhs[3]


def test_read_splits_into_data_in_pdus_with_status_in_last(lu):
    s = Session(lu, mrdsl=8192)
    frames = s.feed(s.command(read10(0, 64), edtl=32768, read=True))
    assert [f.opcode for f in frames] == [W.Op.DATA_IN] * 4
    assert [int.from_bytes(f.bhs[36:40], "big") for f in frames] == [0, 1, 2, 3]  # DataSN
    assert [int.from_bytes(f.bhs[40:44], "big") for f in frames] == [0, 8192, 16384, 24576]
    assert frames[-1].bhs[1] & 0x81 == 0x81 and not frames[0].bhs[1] & 0x01
    data = b"".join(f.data for f in frames)
    assert data == trio.run(lu.device.pread, 0, 32768)


def test_read_residuals_overflow_and_underflow(lu):
    s = Session(lu)
    [f] = s.feed(s.command(read10(0, 1), edtl=200, read=True))
    assert len(f.data) == 200 and f.bhs[1] & 0x04  # O bit
    assert int.from_bytes(f.bhs[44:48], "big") == 312
    [f] = s.feed(s.command(read10(0, 1), edtl=10000, read=True))
    assert len(f.data) == 512 and f.bhs[1] & 0x02  # U bit
    assert int.from_bytes(f.bhs[44:48], "big") == 10000 - 512
    [f] = s.feed(s.command(read10(0, 1), edtl=0, read=True))
    assert f.opcode == W.Op.SCSI_RSP and f.bhs[1] & 0x04 and status_of(f) == 0


def test_write_with_immediate_data_then_r2t(lu):
    s = Session(lu, immediate="Yes", initial_r2t="Yes", burst=8192)
    payload = os.urandom(20480)
    cmd = s.command(write10(8, 40), edtl=len(payload), write=True, data=payload[:4096],
                    final=True)
    [r2t] = s.feed(cmd)
    assert r2t.opcode == W.Op.R2T
    ttt = int.from_bytes(r2t.bhs[20:24], "big")
    offset, length = (int.from_bytes(r2t.bhs[i:i + 4], "big") for i in (40, 44))
    assert (offset, length) == (4096, 8192)
    sent = 4096
    r2tsn = 0
    while True:
        assert int.from_bytes(r2t.bhs[36:40], "big") == r2tsn
        chunks = [payload[o:o + 4096] for o in range(offset, offset + length, 4096)]
        pdus = [W.DataOut(itt=cmd.itt, ttt=ttt, lun=0, final=i == len(chunks) - 1, exp_statsn=0,
                          datasn=i, offset=offset + 4096 * i, data=c)
                for i, c in enumerate(chunks)]
        frames = s.feed(*pdus)
        sent += length
        r2tsn += 1
        if sent >= len(payload):
            break
        [r2t] = frames
        ttt = int.from_bytes(r2t.bhs[20:24], "big")
        offset, length = (int.from_bytes(r2t.bhs[i:i + 4], "big") for i in (40, 44))
    [rsp] = frames
    assert rsp.opcode == W.Op.SCSI_RSP and status_of(rsp) == 0
    assert trio.run(lu.device.pread, 8 * 512, len(payload)) == payload


def test_unsolicited_data_out_when_initial_r2t_no(lu):
    s = Session(lu, immediate="No", initial_r2t="No")
    payload = os.urandom(8192)
    cmd = s.command(write10(0, 16), edtl=8192, write=True, final=False)
    assert s.feed(cmd) == []
    [rsp] = s.feed(
        W.DataOut(itt=cmd.itt, ttt=W.RESERVED_TAG, lun=0, final=False, exp_statsn=0, datasn=0,
                  offset=0, data=payload[:4096]),
        W.DataOut(itt=cmd.itt, ttt=W.RESERVED_TAG, lun=0, final=True, exp_statsn=0, datasn=1,
                  offset=4096, data=payload[4096:]))
    assert status_of(rsp) == 0
    assert trio.run(lu.device.pread, 0, 8192) == payload


def test_bad_datasn_fails_the_command_and_keeps_the_connection(lu):
    s = Session(lu, immediate="No", initial_r2t="No")
    before = trio.run(lu.device.pread, 0, 1024)
    cmd = s.command(write10(0, 2), edtl=1024, write=True, final=False)
    s.feed(cmd)
    frames = s.feed(W.DataOut(itt=cmd.itt, ttt=W.RESERVED_TAG, lun=0, final=True, exp_statsn=0,
                              datasn=27, offset=0, data=b"x" * 1024))
    [rsp] = frames
    assert status_of(rsp) == 2 and rsp.data[2 + 2] & 0x0F == 0x0B  # ABORTED COMMAND
    assert trio.run(lu.device.pread, 0, 1024) == before
    assert not s.conn.closing
    [f] = s.feed(s.command(bytes(6)))  # TEST UNIT READY still works
    assert status_of(f) == 0


def test_write_residuals(lu):
    s = Session(lu, immediate="Yes", initial_r2t="Yes")
    old = trio.run(lu.device.pread, 0, 512)
    [rsp] = s.feed(s.command(write10(0, 1), edtl=200, write=True, data=b"b" * 200))
    assert status_of(rsp) == 0 and rsp.bhs[1] & 0x04  # overflow: wrote only 200 bytes
    assert int.from_bytes(rsp.bhs[44:48], "big") == 312
    assert trio.run(lu.device.pread, 0, 512) == b"b" * 200 + old[200:]
    [rsp] = s.feed(s.command(write10(0, 1), edtl=1024, write=True, data=b"c" * 1024))
    assert status_of(rsp) == 0 and rsp.bhs[1] & 0x02  # underflow: wrote 1 block
    assert int.from_bytes(rsp.bhs[44:48], "big") == 512
    assert trio.run(lu.device.pread, 512, 512) != b"c" * 512


def test_cmdsn_window(lu):
    s = Session(lu)
    expected = s.cmdsn
    assert s.feed(s.command(bytes(6), cmdsn=expected + 1000)) == []  # beyond MaxCmdSN: dropped
    assert s.feed(s.command(bytes(6), cmdsn=expected - 1)) == []  # already used: dropped
    [f] = s.feed(s.command(bytes(6), cmdsn=expected))
    assert int.from_bytes(f.bhs[28:32], "big") == expected + 1  # ExpCmdSN
    assert int.from_bytes(f.bhs[32:36], "big") > expected + 1  # a window > 1
    [f] = s.feed(s.command(bytes(6), immediate=True, cmdsn=expected + 1))
    assert int.from_bytes(f.bhs[28:32], "big") == expected + 1  # immediate: no advance


def test_nop_echo_and_statsn(lu):
    s = Session(lu)
    [a] = s.feed(W.NopOut(itt=50, ttt=W.RESERVED_TAG, lun=0, cmdsn=s.cmdsn, exp_statsn=0,
                          immediate=True, data=b"ping"))
    [b] = s.feed(W.NopOut(itt=51, ttt=W.RESERVED_TAG, lun=0, cmdsn=s.cmdsn, exp_statsn=0,
                          immediate=True))
    assert a.opcode == W.Op.NOP_IN and a.data == b"ping"
    assert int.from_bytes(a.bhs[16:20], "big") == 50
    assert int.from_bytes(a.bhs[20:24], "big") == W.RESERVED_TAG
    assert int.from_bytes(b.bhs[24:28], "big") == int.from_bytes(a.bhs[24:28], "big") + 1
    assert s.feed(W.NopOut(itt=W.RESERVED_TAG, ttt=W.RESERVED_TAG, lun=0, cmdsn=s.cmdsn,
                           exp_statsn=0, immediate=True)) == []


def test_send_targets_in_normal_session(lu):
    s = Session(lu)
    [f] = s.feed(W.TextRequest(itt=60, ttt=W.RESERVED_TAG, final=True, cont=False, lun=0,
                               cmdsn=s.cmdsn, exp_statsn=0, immediate=True,
                               data=encode_text([("SendTargets", "All")])))
    assert dict(parse_text(f.data)) == {"TargetName": IQN, "TargetAddress": "127.0.0.1:3260,1"}


def test_abort_task_and_lun_reset_unit_attention(lu):
    s = Session(lu, immediate="No", initial_r2t="Yes")
    other = Session(lu)
    cmd = s.command(write10(0, 8), edtl=4096, write=True)
    [r2t] = s.feed(cmd)
    assert r2t.opcode == W.Op.R2T
    [tmf] = s.feed(W.TaskManagementRequest(itt=70, function=1, lun=0, ref_itt=cmd.itt,
                                           cmdsn=s.cmdsn, exp_statsn=0, ref_cmdsn=cmd.cmdsn,
                                           immediate=True))
    assert tmf.opcode == W.Op.TMF_RSP and tmf.bhs[2] == 0
    # Data for the aborted task is dropped silently.
    assert s.feed(W.DataOut(itt=cmd.itt, ttt=int.from_bytes(r2t.bhs[20:24], "big"), lun=0,
                            final=True, exp_statsn=0, datasn=0, offset=0,
                            data=bytes(4096))) == []
    [tmf] = s.feed(W.TaskManagementRequest(itt=71, function=5, lun=0, ref_itt=W.RESERVED_TAG,
                                           cmdsn=s.cmdsn, exp_statsn=0, ref_cmdsn=0,
                                           immediate=True))
    assert tmf.bhs[2] == 0
    [ua] = other.feed(other.command(bytes(6)))
    assert status_of(ua) == 2 and ua.data[2 + 2] & 0x0F == 0x06 and ua.data[2 + 12] == 0x29
    [ok] = other.feed(other.command(bytes(6)))
    assert status_of(ok) == 0
    [ua] = s.feed(s.command(bytes(6)))  # every nexus sees it, the requester's too
    assert status_of(ua) == 2 and ua.data[2 + 12] == 0x29


def test_logout_closes(lu):
    s = Session(lu)
    [f] = s.feed(W.LogoutRequest(itt=80, reason=0, cid=0, cmdsn=s.cmdsn, exp_statsn=0,
                                 immediate=True))
    assert f.opcode == W.Op.LOGOUT_RSP and f.bhs[2] == 0 and s.conn.closing


def test_corrupt_data_gives_medium_error(tmp_path):
    from obdfuse.errors import CorruptDataError

    class CorruptDevice(RawFileDevice):
        async def pread(self, offset, length):
            raise CorruptDataError(f"layer x: bad block at {offset}")

    path = tmp_path / "c.img"
    path.write_bytes(bytes(65536))
    dev = CorruptDevice(path)
    s = Session(LogicalUnit(dev))
    [f] = s.feed(s.command(read10(0, 1), edtl=512, read=True))
    assert status_of(f) == 2
    sense = f.data[2:]
    assert sense[2] & 0x0F == 0x03 and sense[12] == 0x11  # MEDIUM ERROR, unrecovered read
    trio.run(dev.aclose)


def test_abort_of_a_running_task_answers_after_it_stops(lu):
    s = Session(lu)
    cmd = s.command(read10(0, 8), edtl=4096, read=True)
    [task] = s.conn.receive_data(wire(cmd))  # handed to the driver, not finished yet
    s.conn.receive_data(wire(W.TaskManagementRequest(
        itt=90, function=1, lun=0, ref_itt=cmd.itt, cmdsn=s.cmdsn, exp_statsn=0,
        ref_cmdsn=cmd.cmdsn, immediate=True)))
    assert s.conn.data_to_send() == []  # no answer while the task may still run
    s.conn.complete(task, None)  # the driver skipped it (or finished it)
    s.reader.feed(b"".join(bytes(p) for p in s.conn.data_to_send()))
    frame = s.reader.next_frame()
    assert frame.opcode == W.Op.TMF_RSP and frame.bhs[2] == 0
    assert s.reader.next_frame() is None  # and no SCSI response for the aborted task


# ------------------------------------------------------------------ persistent reservations


def pr_params(key: int, sa_key: int = 0) -> bytes:
    return key.to_bytes(8, "big") + sa_key.to_bytes(8, "big") + bytes(8)


def test_persistent_reservation_rules():
    from obdfuse.iscsi.reservations import Conflict, PersistentReservations

    pr = PersistentReservations()
    a, b = "iqn.a,i,0x01#1", "iqn.b,i,0x02#2"
    pr.out(a, 0, 0, pr_params(0, 0xA))  # REGISTER
    pr.out(b, 6, 0, pr_params(0, 0xB))  # REGISTER AND IGNORE EXISTING KEY
    with pytest.raises(Conflict):
        pr.out(b, 1, 1, pr_params(0xBAD))  # RESERVE with the wrong key
    pr.out(a, 1, 1, pr_params(0xA))  # a: WRITE EXCLUSIVE
    assert pr.conflicts(b, writes=True) and not pr.conflicts(b, writes=False)
    assert not pr.conflicts(a, writes=True)
    assert pr.read_reservation()[8:16] == (0xA).to_bytes(8, "big")
    # the same nexus after session reinstatement (new TSIH) is still the holder
    assert not pr.conflicts("iqn.a,i,0x01#9", writes=True)
    with pytest.raises(Conflict):
        pr.out(b, 1, 3, pr_params(0xB))  # b cannot reserve over a
    pr.out(b, 4, 3, pr_params(0xB, 0xA))  # b preempts a: EXCLUSIVE ACCESS
    assert "iqn.a,i,0x01" not in pr.keys
    assert pr.conflicts(a, writes=False)
    assert ("iqn.a,i,0x01", (0x2A, 0x05)) in pr.notices
    pr.out(b, 3, 0, pr_params(0xB))  # CLEAR
    assert pr.reservation is None and not pr.keys
    with pytest.raises(ScsiError):
        pr.out(a, 0, 0, pr_params(0, 1)[:20])  # parameter list length error
