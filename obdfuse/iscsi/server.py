"""The trio TCP driver of the iSCSI target: sockets, tasks, deadlines, limits.

One task reads and parses each connection (sans-IO `Connection`), one executes
its SCSI commands in order against the logical unit; output is flushed under a
lock. Connections are capped, logins must finish within a deadline, reads are
bounded, and a session that logs in again with the same initiator name and ISID
replaces the old one. Nothing here knows PDU layouts.
"""

from __future__ import annotations

import contextlib
import logging
import socket
from dataclasses import dataclass, field

import trio

from obdfuse.device import BlockDevice
from obdfuse.fileio import _libc
from obdfuse.iscsi.login import ChapCredentials
from obdfuse.iscsi.scsi import LogicalUnit
from obdfuse.iscsi.session import Connection, TargetConfig

log = logging.getLogger("obdfuse.iscsi")

DEFAULT_IQN = "iqn.2024-01.io.obdfuse:image"
DEFAULT_PORT = 3260
RECV_CHUNK = 1 << 20
SMALL_RECV = 65536
IOV_MAX = 1024
SEND_BUFFER = 4 << 20
LOGIN_TIMEOUT = 15.0
LINGER_SECONDS = 1.0
BATCH_QUEUE = 16
# Batches executed at once per connection: while one waits on a device read running
# in a worker thread, another can send (responses are tagged, so order is free).
EXECUTORS = 4
BATCH_BYTES = 256 * 1024
LINGER_BYTES = 4 << 20
# glibc serves allocations above its mmap threshold (128 KiB until a freed mapping raises
# it) with a fresh mmap, and gives heap top back above its trim threshold: either way each
# 256 KiB read buffer costs page faults. Fixed thresholds keep them on a warm heap.
MALLOC_MMAP_THRESHOLD = 4 << 20
MALLOC_TRIM_THRESHOLD = 16 << 20
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


@dataclass
class Limits:
    """Resource limits against floods and misbehaving peers."""

    max_connections: int = 64
    max_logging_in: int = 16
    login_timeout: float = LOGIN_TIMEOUT


@dataclass
class _Sessions:
    """Live sessions by (initiator name, ISID), for reinstatement."""

    by_key: dict[tuple[str, bytes], trio.CancelScope] = field(default_factory=dict)


def parse_listen(listen: str) -> tuple[str, int]:
    """`HOST:PORT`, `[v6]:PORT`, `HOST` or `:PORT` into (host, port)."""
    text = listen.strip()
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port = rest.lstrip(":")
    elif text.count(":") == 1:
        host, port = text.split(":")
    else:
        host, port = text, ""
    try:
        return host or "127.0.0.1", int(port) if port else DEFAULT_PORT
    except ValueError as exc:
        raise ValueError(f"bad listen address {listen!r} (use HOST:PORT)") from exc


def is_loopback(host: str) -> bool:
    """True if `host` only accepts local connections."""
    return host in ("localhost", "::1") or host.startswith("127.")


class IscsiServer:
    """Serves one target (its LUs) on TCP listeners."""

    def __init__(self, config: TargetConfig, limits: Limits | None = None) -> None:
        self.config = config
        self.limits = limits or Limits()
        self._sessions = _Sessions()
        self._conn_count = 0
        # Connections still logging in, oldest first: a flood of idle connections is
        # evicted oldest-first rather than locking real initiators out.
        self._logging_in: dict[int, trio.CancelScope] = {}
        self.connections_served = 0

    async def serve(self, host: str, port: int, *,
                    task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Listen and serve forever; `task_status.started` gets the bound port."""
        _keep_buffers_on_the_heap()
        listeners = await trio.open_tcp_listeners(port, host=host)
        bound = listeners[0].socket.getsockname()[1]
        log.info("iSCSI target %s listening on %s:%d", self.config.iqn, host, bound)
        task_status.started(bound)
        await trio.serve_listeners(self._handle, listeners)

    def _evict_oldest_login(self) -> bool:
        for key, scope in self._logging_in.items():
            del self._logging_in[key]
            scope.cancel()
            return True
        return False

    async def _handle(self, stream: trio.SocketStream) -> None:
        if len(self._logging_in) >= self.limits.max_logging_in:
            self._evict_oldest_login()
        if self._conn_count >= self.limits.max_connections and not self._evict_oldest_login():
            await stream.aclose()
            return
        self._conn_count += 1
        self.connections_served += 1
        try:
            stream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            stream.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            with contextlib.suppress(OSError, AttributeError):  # a dead peer frees its slot
                stream.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 60)
                stream.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 10)
                stream.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 6)
            with contextlib.suppress(OSError):  # room for a few big Data-In PDUs per send
                stream.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER)
            await self._run_connection(stream)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            log.debug("iSCSI connection ended: %s", exc)
        except Exception:  # a bug must cost one connection, never the target
            log.exception("iSCSI connection failed")
        finally:
            self._conn_count -= 1
            await trio.aclose_forcefully(stream)

    async def _run_connection(self, stream: trio.SocketStream) -> None:
        sockname = stream.socket.getsockname()
        host = sockname[0]
        portal = f"[{host}]:{sockname[1]}" if ":" in host else f"{host}:{sockname[1]}"
        conn = Connection(self.config, portal=portal)
        send_lock = trio.Lock()

        async def flush() -> None:
            async with send_lock:
                parts = conn.data_to_send()
                if parts:
                    await _send_vectored(stream.socket, parts)

        scope = trio.CancelScope()
        key = None
        try:
            with scope:
                if await self._login(stream, conn, flush):
                    key = conn.session_key
                    if key is not None:
                        old = self._sessions.by_key.get(key)
                        if old is not None:
                            old.cancel()  # session reinstatement
                        self._sessions.by_key[key] = scope
                    await self._full_feature(stream, conn, flush)
            if not scope.cancelled_caught and (conn.full_feature or conn.closing):
                await self._linger(stream)
        finally:
            conn.nexus_lost()
            if key is not None and self._sessions.by_key.get(key) is scope:
                del self._sessions.by_key[key]
            if conn.cold_reset:
                for other in list(self._sessions.by_key.values()):
                    other.cancel()

    @staticmethod
    async def _linger(stream) -> None:
        """Close politely: stop sending, then drain (bounded) what the peer still sends,
        so a final Reject/Logout Response is not destroyed by a TCP reset."""
        with trio.move_on_after(LINGER_SECONDS):
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError,
                                     OSError):
                await stream.send_eof()
            drained = 0
            while drained < LINGER_BYTES:
                data = await stream.receive_some(RECV_CHUNK)
                if not data:
                    break
                drained += len(data)

    async def _login(self, stream, conn: Connection, flush) -> bool:
        """Run the login phase under a deadline; the connection may be evicted by newer
        ones while it has not logged in."""
        with trio.move_on_after(self.limits.login_timeout) as scope:
            key = id(scope)
            self._logging_in[key] = scope
            try:
                while not conn.full_feature:
                    data = await stream.receive_some(RECV_CHUNK)
                    if not data:
                        return False
                    tasks = conn.receive_data(data)
                    await flush()
                    if conn.closing or tasks:  # no task can exist before full feature
                        return False
                return True
            finally:
                self._logging_in.pop(key, None)
        log.info("iSCSI login timed out or was evicted by newer connections")
        return False

    async def _full_feature(self, stream, conn: Connection, flush) -> None:
        # Tasks travel in batches (all that one receive completed), and the executor
        # flushes once per batch: one send() for many responses.
        send_batches, recv_batches = trio.open_memory_channel(BATCH_QUEUE)

        async def execute() -> None:
            async for batch in recv_batches:
                for task in batch:
                    if task.aborted:
                        conn.complete(task, None)
                        continue
                    lu = self.config.luns[task.lun]
                    result = await lu.execute(conn.nexus, task.cdb, bytes(task.buf),
                                              task.edtl if task.write else None)
                    conn.complete(task, result)
                await flush()

        async with trio.open_nursery() as nursery:
            for _ in range(EXECUTORS):
                nursery.start_soon(execute)
            try:
                async with send_batches:
                    # Anything that arrived together with the final login PDU.
                    pending = conn.receive_data(b"") if conn.reader.buffered else []
                    while True:
                        for batch in _batches(pending):
                            await send_batches.send(batch)
                        await flush()
                        if conn.closing:
                            break
                        data = await stream.receive_some(_chunk(conn))
                        if not data:
                            break
                        pending = conn.receive_data(data)
            finally:
                nursery.cancel_scope.cancel()


def _keep_buffers_on_the_heap() -> None:
    """Fix glibc's malloc thresholds (see MALLOC_MMAP_THRESHOLD); no-op elsewhere."""
    with contextlib.suppress(OSError, AttributeError):
        libc = _libc()
        libc.mallopt(_M_MMAP_THRESHOLD, MALLOC_MMAP_THRESHOLD)
        libc.mallopt(_M_TRIM_THRESHOLD, MALLOC_TRIM_THRESHOLD)


async def _send_vectored(sock, parts: list) -> None:
    """Send every buffer with scatter-gather sendmsg (no joining copy of read data)."""
    views = [memoryview(p) for p in parts]
    while views:
        sent = await sock.sendmsg(views[:IOV_MAX])
        while sent and views:
            n = views[0].nbytes
            if sent >= n:
                sent -= n
                views.pop(0)
            else:
                views[0] = views[0][sent:]
                sent = 0


def _batches(tasks: list) -> list[list]:
    """Group tasks so that each group moves about BATCH_BYTES: many small commands
    share one flush, big transfers run on separate executors."""
    groups: list[list] = []
    size = BATCH_BYTES
    for task in tasks:
        if size >= BATCH_BYTES:
            groups.append([])
            size = 0
        groups[-1].append(task)
        size += max(task.edtl, 4096)
    return groups


def _chunk(conn: Connection) -> int:
    """How much to ask the socket for: small buffers stay off mmap (a 1 MiB receive
    buffer costs page faults per call); big Data-Out PDUs get what they need."""
    return min(max(SMALL_RECV, conn.reader.wanted()), RECV_CHUNK)


async def serve_iscsi(device: BlockDevice, listen: str = f"127.0.0.1:{DEFAULT_PORT}",
                      iqn: str = DEFAULT_IQN, chap: ChapCredentials | None = None,
                      task_status=trio.TASK_STATUS_IGNORED, *,
                      limits: Limits | None = None) -> None:
    """Serve `device` as LUN 0 of target `iqn` until cancelled.

    Use inside a trio nursery: `port = await nursery.start(serve_iscsi, dev, ...)`.
    """
    host, port = parse_listen(listen)
    # The LU identity (VPD 80h/83h) follows the target name and the backing device.
    lu = LogicalUnit(device, name=f"{iqn}:{getattr(device, 'name', '')}")
    config = TargetConfig(iqn=iqn, luns={0: lu}, chap=chap)
    await IscsiServer(config, limits).serve(host, port, task_status=task_status)
