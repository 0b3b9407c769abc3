"""The crossing from trio into asyncio: one asyncio loop in a daemon thread.

aiohttp needs asyncio; the daemon runs on trio. This module owns one asyncio
event loop running in a dedicated daemon thread (started lazily, stopped by
`shutdown()` or at interpreter exit) and `run_in_asyncio`, which a trio task
awaits to run a coroutine on that loop. The trio task sleeps in
`wait_task_rescheduled` and is woken through its trio token when the asyncio
task finishes: the trio loop is never blocked. Cancelling the trio task cancels
the asyncio task and waits until it has really ended (structured: no asyncio
work outlives the trio call that started it).

Nothing else about HTTP lives here.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import threading
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import outcome
import trio

T = TypeVar("T")


class AsyncioThread:
    """An asyncio event loop running forever in one daemon thread."""

    def __init__(self, name: str = "obdfuse-asyncio") -> None:
        self._name = name
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    @property
    def running(self) -> bool:
        return self._loop is not None

    def loop(self) -> asyncio.AbstractEventLoop:
        """The loop, starting the thread on first use."""
        with self._lock:
            if self._loop is None:
                loop = asyncio.new_event_loop()
                started = threading.Event()

                def serve() -> None:
                    asyncio.set_event_loop(loop)
                    loop.call_soon(started.set)
                    loop.run_forever()

                thread = threading.Thread(target=serve, name=self._name, daemon=True)
                thread.start()
                started.wait()
                self._loop, self._thread = loop, thread
            return self._loop

    def shutdown(self, timeout: float = 5.0) -> None:
        """Cancel every task still on the loop, stop it and join the thread."""
        with self._lock:
            loop, thread = self._loop, self._thread
            self._loop = self._thread = None
        if loop is None or thread is None:
            return

        async def drain() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await loop.shutdown_asyncgens()

        with contextlib.suppress(Exception):  # best effort at shutdown
            asyncio.run_coroutine_threadsafe(drain(), loop).result(timeout)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout)
        if not thread.is_alive():
            loop.close()


_DEFAULT = AsyncioThread()
atexit.register(_DEFAULT.shutdown)


def asyncio_loop() -> asyncio.AbstractEventLoop:
    """The shared asyncio loop (started on first use)."""
    return _DEFAULT.loop()


def shutdown() -> None:
    """Stop the shared asyncio loop; a later `run_in_asyncio` starts a new one."""
    _DEFAULT.shutdown()


async def run_in_asyncio(
    coro_fn: Callable[..., Awaitable[T]], *args: Any, thread: AsyncioThread | None = None
) -> T:
    """Await `coro_fn(*args)` on the asyncio thread from a trio task.

    The result or exception is delivered to the trio task. If the trio task is
    cancelled, the asyncio task is cancelled and this returns (raising
    trio.Cancelled) only once the asyncio task has finished.
    """
    loop = (thread or _DEFAULT).loop()
    token = trio.lowlevel.current_trio_token()
    trio_task = trio.lowlevel.current_task()
    state: dict[str, Any] = {"task": None, "cancel": False, "raise_cancel": None}
    guard = threading.Lock()

    def deliver(result: outcome.Outcome) -> None:
        with contextlib.suppress(trio.RunFinishedError):  # run gone: nobody to wake
            token.run_sync_soon(trio.lowlevel.reschedule, trio_task, result)

    def on_done(task: asyncio.Future) -> None:
        if task.cancelled():
            raise_cancel = state["raise_cancel"]
            if raise_cancel is not None:
                deliver(outcome.capture(raise_cancel))
            else:  # cancelled by someone else (loop shutdown)
                deliver(outcome.Error(RuntimeError("asyncio task was cancelled")))
            return
        exc = task.exception()
        deliver(outcome.Error(exc) if exc is not None else outcome.Value(task.result()))

    def start() -> None:
        with guard:
            if state["cancel"]:
                deliver(outcome.capture(state["raise_cancel"]))
                return
            try:
                coro = coro_fn(*args)
                task = asyncio.ensure_future(coro)
            except BaseException as exc:  # handed to the trio task
                deliver(outcome.Error(exc))
                return
            state["task"] = task
        task.add_done_callback(on_done)

    def cancel_on_loop() -> None:
        with guard:
            task = state["task"]
        if task is not None:
            task.cancel()

    def abort(raise_cancel: Callable[[], Any]) -> trio.lowlevel.Abort:
        with guard:
            state["cancel"] = True
            state["raise_cancel"] = raise_cancel
        try:
            loop.call_soon_threadsafe(cancel_on_loop)
        except RuntimeError:  # loop closed: the task can no longer run
            return trio.lowlevel.Abort.SUCCEEDED
        return trio.lowlevel.Abort.FAILED  # we are woken when the asyncio task ends

    loop.call_soon_threadsafe(start)
    return await trio.lowlevel.wait_task_rescheduled(abort)
