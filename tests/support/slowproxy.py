"""A TCP proxy on 127.0.0.1 that adds latency and caps bandwidth (a slow WAN link).

Each direction is one shared link: a chunk occupies it for len/rate seconds
and arrives `rtt/2` after leaving, so concurrent connections share the
bandwidth as on a real link. Used by tests and `scripts/bench/lazy.py`.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time

from tests.support.registry import free_port


class _Link:
    def __init__(self, rate: float, delay: float) -> None:
        self.rate = rate  # bytes per second
        self.delay = delay  # one-way seconds
        self.next_free = 0.0
        self.bytes = 0

    def schedule(self, n: int) -> float:
        now = time.monotonic()
        start = max(now, self.next_free)
        self.next_free = start + n / self.rate
        self.bytes += n
        return self.next_free + self.delay


class SlowProxy:
    """`SlowProxy(target_port, mbit=100, rtt_ms=20)`; clients connect to `.port`."""

    def __init__(self, target_port: int, *, mbit: float = 100.0, rtt_ms: float = 20.0,
                 target_host: str = "127.0.0.1") -> None:
        self.target = (target_host, target_port)
        self.port = free_port()
        rate = mbit * 1e6 / 8
        self.down = _Link(rate, rtt_ms / 2000)  # server → client
        self.up = _Link(rate, rtt_ms / 2000)  # client → server
        self.connections = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.base_events.Server | None = None

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def bytes_down(self) -> int:
        return self.down.bytes

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    link: _Link) -> None:
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def deliver() -> None:
            while True:
                at, chunk = await queue.get()
                if not chunk:
                    break
                wait = at - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                writer.write(chunk)
                await writer.drain()
            writer.close()

        task = asyncio.ensure_future(deliver())
        try:
            while True:
                chunk = await reader.read(16384)
                if not chunk:
                    break
                queue.put_nowait((link.schedule(len(chunk)), chunk))
        except (ConnectionError, OSError):
            pass
        finally:
            queue.put_nowait((0.0, b""))
            with contextlib.suppress(ConnectionError, OSError):
                await task

    async def _handle(self, c_reader: asyncio.StreamReader, c_writer: asyncio.StreamWriter):
        self.connections += 1
        try:
            s_reader, s_writer = await asyncio.open_connection(*self.target)
        except OSError:
            c_writer.close()
            return
        await asyncio.gather(self._pump(c_reader, s_writer, self.up),
                             self._pump(s_reader, c_writer, self.down),
                             return_exceptions=True)

    def start(self) -> SlowProxy:
        ready = threading.Event()

        def serve() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            self._server = loop.run_until_complete(
                asyncio.start_server(self._handle, "127.0.0.1", self.port))
            ready.set()
            loop.run_forever()
            loop.close()

        self._thread = threading.Thread(target=serve, daemon=True, name="slow-proxy")
        self._thread.start()
        ready.wait(10)
        return self

    def stop(self) -> None:
        if self._loop is None:
            return
        loop = self._loop

        async def close() -> None:
            if self._server:
                self._server.close()
            for task in asyncio.all_tasks():
                if task is not asyncio.current_task():
                    task.cancel()

        asyncio.run_coroutine_threadsafe(close(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        if self._thread:
            self._thread.join(10)
        self._loop = None

    def __enter__(self) -> SlowProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
