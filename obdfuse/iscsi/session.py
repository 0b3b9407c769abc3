"""One iSCSI connection/session of the target (RFC 7143), sans-IO.

Owns login-to-full-feature transitions, CmdSN/StatSN numbering, immediate and
unsolicited data, R2T solicitation with DataSN/offset checks, Data-In
segmentation with residuals, NOP, Text/SendTargets, task management and
logout. It is fed frames and finished SCSI results; it produces wire bytes and
`Task`s for the driver to execute. No sockets, no clocks.
"""

from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass, field

from obdfuse.iscsi import params as P
from obdfuse.iscsi import pdu as W
from obdfuse.iscsi import sense as S
from obdfuse.iscsi.login import ChapCredentials, LoginFailed, LoginStage
from obdfuse.iscsi.scsi import LogicalUnit, ScsiResult

CMDSN_WINDOW = 64
MAX_SOLICITING = 4  # write tasks holding an R2T at once (bounds buffered data)
MAX_PENDING_TASKS = 256

DATA_PHASE_ERROR = (0x4B, 0x00)
DATA_OFFSET_ERROR = (0x4B, 0x05)

TMF_ABORT_TASK = 1
TMF_ABORT_TASK_SET = 2
TMF_CLEAR_ACA = 3
TMF_CLEAR_TASK_SET = 4
TMF_LUN_RESET = 5
TMF_TARGET_WARM_RESET = 6
TMF_TARGET_COLD_RESET = 7
TMF_COMPLETE, TMF_NO_TASK, TMF_NO_LUN, TMF_NOT_SUPPORTED = 0, 1, 2, 5


def _sn_lt(a: int, b: int) -> bool:
    """Serial number arithmetic a < b (RFC 1982, 32 bits)."""
    return a != b and ((b - a) & 0xFFFFFFFF) < 0x80000000


@dataclass(frozen=True)
class TargetConfig:
    """What every connection of one target shares."""

    iqn: str
    luns: dict[int, LogicalUnit]
    chap: ChapCredentials | None = None
    portal_group: int = 1


@dataclass(eq=False, slots=True)
class Task:
    """A SCSI command on its way through the session."""

    itt: int
    lun: int
    cdb: bytes
    edtl: int
    read: bool
    write: bool
    cmdsn: int
    lun_field: int = 0  # the 8-byte LUN field as the initiator sent it
    wanted: int = 0  # data-out bytes the CDB asks for
    needed: int = 0  # data-out bytes we will accept into the buffer
    buf: bytearray = field(default_factory=bytearray)
    received: int = 0  # data-out bytes seen (including any beyond `needed`)
    unsolicited_done: bool = True
    next_datasn: int = 0
    r2t_ttt: int | None = None
    r2t_offset: int = 0
    r2t_length: int = 0
    r2tsn: int = 0
    aborted: bool = False


class Connection:
    """The target side of one TCP connection; one session (MaxConnections=1)."""

    def __init__(self, config: TargetConfig, *, portal: str = "127.0.0.1:3260",
                 max_data: int = P.TARGET_MRDSL) -> None:
        self.config = config
        self.portal = portal
        self.reader = W.FrameReader(max_data=8192 + 1024)
        self._max_data = max_data
        self.login = LoginStage(target_name=config.iqn, portal_group=config.portal_group,
                                chap=config.chap)
        self.params = self.login.params
        self.full_feature = False
        self.closing = False
        self.cold_reset = False
        self.nexus = ""
        self.session_key: tuple[str, bytes] | None = None
        self.statsn = 0
        self.exp_cmdsn = 0
        self._first_login = True
        self._out: list[bytes | memoryview] = []
        self._tasks: dict[int, Task] = {}
        self._ttts = itertools.count(1)
        self._soliciting = 0
        self._waiting_r2t: deque[Task] = deque()
        self._text_pending: bytes = b""
        self._text_ttt = 0
        self._text_in = bytearray()
        self._send_header_digest = False
        self._send_data_digest = False
        self._in_flight: set[Task] = set()  # tasks the driver is executing
        # TMF responses held until the aborted tasks they cover have stopped.
        self._tmf_waiting: list[tuple[set[Task], W.TaskManagementRequest, int]] = []

    # ------------------------------------------------------------ driver api

    @property
    def max_cmdsn(self) -> int:
        return (self.exp_cmdsn + CMDSN_WINDOW - 1) & 0xFFFFFFFF

    def receive_data(self, data: bytes) -> list[Task]:
        """Feed received bytes; returns tasks now ready to execute (in order)."""
        self.reader.feed(data)
        ready: list[Task] = []
        while not self.closing:
            try:
                frame = self.reader.next_frame()
                if frame is None:
                    break
                handed = self._dispatch(frame)
                for task in handed:
                    self._in_flight.add(task)
                ready += handed
            except W.ProtocolError as exc:
                self._reject(exc.reason, exc.bhs)
                if exc.fatal:
                    self.closing = True
        return ready

    def data_to_send(self) -> list[bytes | memoryview]:
        """Wire bytes queued since the last call."""
        out, self._out = self._out, []
        return out

    def complete(self, task: Task, result: ScsiResult | None) -> None:
        """A task handed out by `receive_data` is done: queue its Data-In and status.

        `result` is None when the driver skipped an aborted task. Every handed-out
        task must come back here: task-management answers wait for them.
        """
        if self._tasks.get(task.itt) is task:
            del self._tasks[task.itt]
        self._in_flight.discard(task)
        if self._tmf_waiting:
            self._release_tmf_responses()
        if task.aborted or self.closing or result is None:
            return
        lu = self.config.luns.get(task.lun)
        if result.status != S.GOOD and result.status != S.CONDITION_MET:
            sense = lu.sense_bytes(result.sense) if (lu and result.sense) else b""
            self._respond(task, result.status, sense=sense)
            return
        status = result.status
        data = result.data
        if task.read and data:
            n = len(data)
            send = min(n, task.edtl)
            over, under = n > task.edtl, n < task.edtl
            residual = abs(n - task.edtl)
            if send:
                self._data_in(task, memoryview(data)[:send], status, over, under, residual)
                return
            self._respond(task, status, over=over, under=under, residual=residual)
            return
        if task.write:
            over, under = task.wanted > task.edtl, task.wanted < task.edtl
            self._respond(task, status, over=over, under=under,
                          residual=abs(task.wanted - task.edtl))
            return
        if task.read and task.edtl:
            self._respond(task, status, under=True, residual=task.edtl)
            return
        self._respond(task, status)

    def nexus_lost(self) -> None:
        """The connection is gone: release the nexus' LU state."""
        if self.nexus:
            for lu in self.config.luns.values():
                lu.detach(self.nexus)
            self.nexus = ""

    # ------------------------------------------------------------ output

    def _emit(self, pdu: W.TargetPdu) -> None:
        bhs, data = W.encode_pdu(pdu)
        self._out += W.frame_bytes(bhs, data, header_digest=self._send_header_digest,
                                   data_digest=self._send_data_digest)

    def _next_statsn(self) -> int:
        sn = self.statsn
        self.statsn = (sn + 1) & 0xFFFFFFFF
        return sn

    def _reject(self, reason: int, bhs: bytes) -> None:
        self._emit(W.Reject(reason=reason, statsn=self._next_statsn(), exp_cmdsn=self.exp_cmdsn,
                            max_cmdsn=self.max_cmdsn, bhs=bhs.ljust(W.BHS_LEN, b"\0")))

    def _respond(self, task: Task, status: int, *, sense: bytes = b"", over: bool = False,
                 under: bool = False, residual: int = 0, exp_datasn: int = 0) -> None:
        self._emit(W.ScsiResponse(
            itt=task.itt, status=status, statsn=self._next_statsn(), exp_cmdsn=self.exp_cmdsn,
            max_cmdsn=self.max_cmdsn, overflow=over, underflow=under,
            residual=residual if (over or under) else 0, exp_datasn=exp_datasn, sense=sense))

    def _data_in(self, task: Task, data: memoryview, status: int, over: bool, under: bool,
                 residual: int) -> None:
        seg = max(512, self.params.initiator_mrdsl)
        burst = max(seg, self.params.max_burst)
        total = len(data)
        datasn = 0
        off = 0
        while off < total:
            n = min(seg, total - off, burst - off % burst)
            last = off + n >= total
            bhs = W.data_in_header(
                task.itt, task.lun_field, n, datasn, off, self.exp_cmdsn, self.max_cmdsn,
                final=last or (off + n) % burst == 0, status_present=last,
                status=status if last else 0, statsn=self._next_statsn() if last else 0,
                overflow=over and last, underflow=under and last,
                residual=residual if last and (over or under) else 0)
            self._out += W.frame_bytes(bhs, data[off:off + n],
                                       header_digest=self._send_header_digest,
                                       data_digest=self._send_data_digest)
            datasn += 1
            off += n

    # ------------------------------------------------------------ dispatch

    def _dispatch(self, frame: W.Frame) -> list[Task]:
        pdu = W.decode_pdu(frame)
        if not self.full_feature:
            if isinstance(pdu, W.LoginRequest):
                self._login(pdu)
                return []
            raise W.ProtocolError("only Login is allowed before full-feature phase",
                                  bhs=frame.bhs)
        if isinstance(pdu, W.ScsiCommand):
            return self._scsi_command(pdu, frame.bhs)
        if isinstance(pdu, W.DataOut):
            return self._data_out(pdu, frame.bhs)
        if isinstance(pdu, W.NopOut):
            self._nop_out(pdu)
        elif isinstance(pdu, W.TextRequest):
            self._text(pdu)
        elif isinstance(pdu, W.TaskManagementRequest):
            return self._tmf(pdu)
        elif isinstance(pdu, W.LogoutRequest):
            self._logout(pdu)
        elif isinstance(pdu, W.LoginRequest):
            raise W.ProtocolError("Login during full-feature phase", bhs=frame.bhs)
        else:  # SNACK needs ErrorRecoveryLevel > 0
            self._reject(W.RejectReason.COMMAND_NOT_SUPPORTED, frame.bhs)
        return []

    def _accept_cmdsn(self, cmdsn: int, immediate: bool) -> bool:
        """Check the CmdSN window; advance ExpCmdSN for a non-immediate command."""
        if immediate:
            return True
        if cmdsn == self.exp_cmdsn:
            self.exp_cmdsn = (cmdsn + 1) & 0xFFFFFFFF
            return True
        if _sn_lt(self.exp_cmdsn, cmdsn) and not _sn_lt(self.max_cmdsn, cmdsn):
            # Ahead of ExpCmdSN but inside the window: on one TCP connection nothing
            # can fill the gap later, so take it rather than stall the session.
            self.exp_cmdsn = (cmdsn + 1) & 0xFFFFFFFF
            return True
        return False  # outside the window: silently ignored (RFC 7143 §3.2.2.1)

    # ------------------------------------------------------------ login

    def _login(self, req: W.LoginRequest) -> None:
        if self._first_login:
            self._first_login = False
            self.statsn = req.exp_statsn
            self.exp_cmdsn = req.cmdsn
        try:
            rsp = self.login.handle(req, statsn=self._next_statsn(), exp_cmdsn=self.exp_cmdsn,
                                    max_cmdsn=self.max_cmdsn)
        except LoginFailed as exc:
            self._emit(W.LoginResponse(
                itt=req.itt, transit=False, csg=req.csg, nsg=0, isid=req.isid, tsih=0,
                statsn=self.statsn, exp_cmdsn=self.exp_cmdsn, max_cmdsn=self.max_cmdsn,
                status_class=exc.status[0], status_detail=exc.status[1]))
            self.closing = True
            return
        if self.login.done:
            if req.tsih:
                self._emit(W.LoginResponse(
                    itt=req.itt, transit=False, csg=req.csg, nsg=0, isid=req.isid, tsih=0,
                    statsn=rsp.statsn, exp_cmdsn=self.exp_cmdsn, max_cmdsn=self.max_cmdsn,
                    status_class=2, status_detail=10))  # session does not exist
                self.closing = True
                return
            tsih = _allocate_tsih()
            self.login.tsih = tsih
            rsp = W.LoginResponse(
                itt=rsp.itt, transit=rsp.transit, csg=rsp.csg, nsg=rsp.nsg, isid=rsp.isid,
                tsih=tsih, statsn=rsp.statsn, exp_cmdsn=rsp.exp_cmdsn, max_cmdsn=rsp.max_cmdsn,
                data=rsp.data)
            self._emit(rsp)
            self._enter_full_feature()
            return
        self._emit(rsp)

    def _enter_full_feature(self) -> None:
        self.full_feature = True
        p = self.params
        self.reader.header_digest = self._send_header_digest = p.header_digest
        self.reader.data_digest = self._send_data_digest = p.data_digest
        self.reader.max_data = self._max_data
        if p.session_type == "Normal":
            self.nexus = f"{p.initiator_name},i,0x{self.login.isid.hex()}#{self.login.tsih}"
            self.session_key = (p.initiator_name, self.login.isid)
            for lu in self.config.luns.values():
                lu.attach(self.nexus)

    # ------------------------------------------------------------ commands

    def _scsi_command(self, cmd: W.ScsiCommand, bhs: bytes) -> list[Task]:
        if self.params.session_type != "Normal":
            self._reject(W.RejectReason.PROTOCOL_ERROR, bhs)
            return []
        if not self._accept_cmdsn(cmd.cmdsn, cmd.immediate):
            return []
        if cmd.itt in self._tasks or len(self._tasks) >= MAX_PENDING_TASKS:
            self._reject(W.RejectReason.TASK_IN_PROGRESS, bhs)
            return []
        lun = _lun_number(cmd.lun)
        task = Task(itt=cmd.itt, lun=lun, cdb=cmd.cdb, edtl=cmd.edtl, read=cmd.read,
                    write=cmd.write, cmdsn=cmd.cmdsn, lun_field=cmd.lun)
        lu = self.config.luns.get(lun)
        if lu is None:
            return self._no_such_lun(task, cmd)
        if not cmd.write:
            if cmd.data:
                self._reject(W.RejectReason.PROTOCOL_ERROR, bhs)
                return []
            self._tasks[task.itt] = task
            return [task]
        task.wanted = lu.data_out_length(cmd.cdb)
        task.needed = min(task.wanted, cmd.edtl)
        if len(cmd.data) > min(cmd.edtl, self.params.first_burst) or (
                cmd.data and not self.params.immediate_data):
            self._reject(W.RejectReason.PROTOCOL_ERROR, bhs)
            return []
        self._tasks[task.itt] = task
        self._accept_data(task, cmd.data)
        unsolicited_total = min(self.params.first_burst, cmd.edtl)
        task.unsolicited_done = (cmd.final or self.params.initial_r2t
                                 or task.received >= unsolicited_total)
        return self._advance_write(task)

    def _no_such_lun(self, task: Task, cmd: W.ScsiCommand) -> list[Task]:
        op = task.cdb[0]
        if op == 0x12 and not cmd.write:  # INQUIRY: peripheral qualifier 3, no device
            data = bytes([0x7F]) + bytes(35)
            alloc = int.from_bytes(task.cdb[3:5], "big")
            self.complete(task, ScsiResult(data=data[:alloc]))
        elif op == 0xA0 and 0 in self.config.luns:
            task.lun = 0
            self._tasks[task.itt] = task
            return [task]
        else:
            sense = S.Sense(S.ILLEGAL_REQUEST, 0x25, 0x00).encode(False)
            self._respond(task, S.CHECK_CONDITION, sense=sense)
        return []

    def _accept_data(self, task: Task, data: bytes) -> None:
        room = task.needed - len(task.buf)
        if room > 0:
            task.buf += data[:room]
        task.received += len(data)

    def _advance_write(self, task: Task) -> list[Task]:
        """Solicit more data, or hand the task over when it has all it needs."""
        if not task.unsolicited_done or task.r2t_ttt is not None:
            return []
        if task.received >= task.needed:
            return [task]
        if self._soliciting >= MAX_SOLICITING:
            self._waiting_r2t.append(task)
            return []
        self._soliciting += 1
        self._send_r2t(task)
        return []

    def _send_r2t(self, task: Task) -> None:
        ttt = next(self._ttts) & 0x7FFFFFFF
        task.r2t_ttt = ttt
        task.r2t_offset = task.received
        task.r2t_length = min(self.params.max_burst, task.needed - task.received)
        task.next_datasn = 0
        self._emit(W.R2T(itt=task.itt, ttt=ttt, lun=task.lun_field, statsn=self.statsn,
                         exp_cmdsn=self.exp_cmdsn, max_cmdsn=self.max_cmdsn, r2tsn=task.r2tsn,
                         offset=task.r2t_offset, length=task.r2t_length))
        task.r2tsn += 1

    def _release_solicitor(self) -> list[Task]:
        self._soliciting -= 1
        while self._waiting_r2t:
            nxt = self._waiting_r2t.popleft()
            if nxt.aborted or nxt.itt not in self._tasks:
                continue
            self._soliciting += 1
            self._send_r2t(nxt)
            break
        return []

    def _data_out(self, d: W.DataOut, bhs: bytes) -> list[Task]:
        task = self._tasks.get(d.itt)
        if task is None or task.aborted:
            return []  # data for an aborted or finished task is dropped
        if d.ttt == W.RESERVED_TAG:
            if task.unsolicited_done:
                raise W.ProtocolError("unsolicited Data-Out not expected", bhs=bhs)
            expected_offset = task.received
            limit = min(self.params.first_burst, task.edtl)
        else:
            if d.ttt != task.r2t_ttt:
                raise W.ProtocolError("Data-Out with an unknown target transfer tag", bhs=bhs)
            expected_offset = task.received
            limit = task.r2t_offset + task.r2t_length
        if d.datasn != task.next_datasn:
            return self._fail_transfer(task, DATA_PHASE_ERROR)
        if d.offset != expected_offset or d.offset + len(d.data) > limit:
            return self._fail_transfer(task, DATA_OFFSET_ERROR)
        task.next_datasn += 1
        self._accept_data(task, d.data)
        if d.ttt == W.RESERVED_TAG:
            if d.final or task.received >= limit:
                task.unsolicited_done = True
                task.next_datasn = 0
                return self._advance_write(task)
            return []
        if task.received >= limit:
            if not d.final:
                raise W.ProtocolError("burst complete without the F bit", bhs=bhs)
            task.r2t_ttt = None
            if task.received >= task.needed:
                self._release_solicitor()
                return [task]
            self._send_r2t(task)
        elif d.final:
            raise W.ProtocolError("F bit before the end of the burst", bhs=bhs)
        return []

    def _fail_transfer(self, task: Task, code: tuple[int, int]) -> list[Task]:
        """End a write whose Data-Out sequence is broken with ABORTED COMMAND;
        its remaining Data-Out PDUs are dropped (ErrorRecoveryLevel 0)."""
        self._abort(task)
        sense = S.Sense(S.ABORTED_COMMAND, *code).encode(self._descriptor_sense(task))
        self._respond(task, S.CHECK_CONDITION, sense=sense)
        return []

    def _descriptor_sense(self, task: Task) -> bool:
        lu = self.config.luns.get(task.lun)
        return bool(lu and lu.d_sense)

    # ------------------------------------------------------------ others

    def _nop_out(self, nop: W.NopOut) -> None:
        if not self._accept_cmdsn(nop.cmdsn, nop.immediate):
            return
        if nop.itt == W.RESERVED_TAG:
            return  # an answer to our ping, or a no-reply ping
        self._emit(W.NopIn(itt=nop.itt, ttt=W.RESERVED_TAG, lun=nop.lun,
                           statsn=self._next_statsn(), exp_cmdsn=self.exp_cmdsn,
                           max_cmdsn=self.max_cmdsn, data=nop.data))

    def _text(self, req: W.TextRequest) -> None:
        if not self._accept_cmdsn(req.cmdsn, req.immediate):
            return
        if req.ttt != W.RESERVED_TAG and req.ttt == self._text_ttt and self._text_pending:
            self._send_text(req.itt)  # continuation of a long reply
            return
        if len(self._text_in) + len(req.data) > P.MAX_TEXT:
            raise W.ProtocolError("text request too long")
        self._text_in += req.data
        if req.cont:
            self._emit(W.TextResponse(itt=req.itt, ttt=next(self._ttts) & 0x7FFFFFFF,
                                      final=False, cont=False, statsn=self._next_statsn(),
                                      exp_cmdsn=self.exp_cmdsn, max_cmdsn=self.max_cmdsn))
            return
        pairs = P.parse_text(bytes(self._text_in))
        self._text_in = bytearray()
        answers: list[tuple[str, str]] = []
        for key, value in pairs:
            if key == "SendTargets":
                if value in ("All", self.config.iqn) or (
                        value == "" and self.params.session_type == "Normal"):
                    answers += [("TargetName", self.config.iqn),
                                ("TargetAddress", f"{self.portal},{self.config.portal_group}")]
            else:
                answers.append((key, "NotUnderstood"))
        self._text_pending = P.encode_text(answers)
        self._send_text(req.itt)

    def _send_text(self, itt: int) -> None:
        limit = max(512, self.params.initiator_mrdsl)
        chunk, self._text_pending = self._text_pending[:limit], self._text_pending[limit:]
        more = bool(self._text_pending)
        self._text_ttt = (next(self._ttts) & 0x7FFFFFFF) if more else 0
        self._emit(W.TextResponse(itt=itt, ttt=self._text_ttt if more else W.RESERVED_TAG,
                                  final=not more, cont=more, statsn=self._next_statsn(),
                                  exp_cmdsn=self.exp_cmdsn, max_cmdsn=self.max_cmdsn,
                                  data=chunk))

    def _tmf(self, req: W.TaskManagementRequest) -> list[Task]:
        if not self._accept_cmdsn(req.cmdsn, req.immediate):
            return []
        lun = _lun_number(req.lun)
        fn = req.function
        affected: list[Task] = []
        response = TMF_COMPLETE
        if fn in (TMF_ABORT_TASK, TMF_ABORT_TASK_SET, TMF_CLEAR_TASK_SET, TMF_LUN_RESET) and (
                lun not in self.config.luns):
            response = TMF_NO_LUN
        elif fn == TMF_ABORT_TASK:
            task = self._tasks.get(req.ref_itt)
            if task is not None:
                affected.append(task)
                self._abort(task)
            elif not _sn_lt(req.ref_cmdsn, self.exp_cmdsn):
                response = TMF_COMPLETE  # not received yet: nothing to do
            else:
                response = TMF_NO_TASK
        elif fn in (TMF_ABORT_TASK_SET, TMF_CLEAR_TASK_SET):
            for task in list(self._tasks.values()):
                if task.lun == lun:
                    affected.append(task)
                    self._abort(task)
        elif fn == TMF_LUN_RESET:
            for task in list(self._tasks.values()):
                if task.lun == lun:
                    affected.append(task)
                    self._abort(task)
            self.config.luns[lun].reset(self.nexus)
        elif fn in (TMF_TARGET_WARM_RESET, TMF_TARGET_COLD_RESET):
            for task in list(self._tasks.values()):
                affected.append(task)
                self._abort(task)
            for lu in self.config.luns.values():
                lu.reset(self.nexus, S.TARGET_RESET_OCCURRED)
            if fn == TMF_TARGET_COLD_RESET:
                self.cold_reset = True  # the driver drops every session (RFC 7143 §11.5.1)
                self.closing = True
        else:
            response = TMF_NOT_SUPPORTED
        running = {t for t in affected if t in self._in_flight}
        if running:  # answer once they have stopped (RFC 7143 §11.6.1)
            self._tmf_waiting.append((running, req, response))
        else:
            self._tmf_response(req, response)
        return []

    def _tmf_response(self, req: W.TaskManagementRequest, response: int) -> None:
        self._emit(W.TaskManagementResponse(itt=req.itt, response=response,
                                            statsn=self._next_statsn(), exp_cmdsn=self.exp_cmdsn,
                                            max_cmdsn=self.max_cmdsn))

    def _release_tmf_responses(self) -> None:
        waiting, self._tmf_waiting = self._tmf_waiting, []
        for running, req, response in waiting:
            running &= self._in_flight
            if running:
                self._tmf_waiting.append((running, req, response))
            else:
                self._tmf_response(req, response)

    def _abort(self, task: Task) -> None:
        task.aborted = True
        self._tasks.pop(task.itt, None)
        if task.r2t_ttt is not None:
            task.r2t_ttt = None
            self._release_solicitor()

    def _logout(self, req: W.LogoutRequest) -> None:
        self._accept_cmdsn(req.cmdsn, req.immediate)
        response = 2 if req.reason == 2 else 0  # connection recovery needs ERL 2
        self._emit(W.LogoutResponse(itt=req.itt, response=response, statsn=self._next_statsn(),
                                    exp_cmdsn=self.exp_cmdsn, max_cmdsn=self.max_cmdsn,
                                    time2wait=self.params.default_time2wait,
                                    time2retain=self.params.default_time2retain))
        self.closing = True


def _lun_number(lun_field: int) -> int:
    """The LUN from the 8-byte SAM LUN field (peripheral or flat addressing)."""
    first = (lun_field >> 48) & 0xFFFF
    return first & 0x3FFF


_tsih_counter = itertools.count(1)


def _allocate_tsih() -> int:
    """A non-zero TSIH, unique for a long time within this process."""
    while True:
        tsih = next(_tsih_counter) & 0xFFFF
        if tsih:
            return tsih
