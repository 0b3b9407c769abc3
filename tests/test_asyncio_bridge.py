"""The trio → asyncio bridge: results, exceptions, cancellation, no blocking."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
import trio

from obdfuse.asyncio_bridge import AsyncioThread, run_in_asyncio


@pytest.fixture
def aio():
    thread = AsyncioThread("test-asyncio")
    yield thread
    thread.shutdown()


def test_result_and_thread(aio):
    async def work(a, b):
        await asyncio.sleep(0.01)
        return a + b, threading.current_thread().name

    async def main():
        return await run_in_asyncio(work, 2, 3, thread=aio)

    assert trio.run(main) == (5, "test-asyncio")


def test_exception_propagates(aio):
    class Boom(Exception):
        pass

    async def work():
        await asyncio.sleep(0)
        raise Boom("bad")

    async def main():
        with pytest.raises(Boom, match="bad"):
            await run_in_asyncio(work, thread=aio)

    trio.run(main)


def test_sync_error_in_coroutine_factory(aio):
    def not_a_coroutine():
        raise ValueError("factory failed")

    async def main():
        with pytest.raises(ValueError, match="factory failed"):
            await run_in_asyncio(not_a_coroutine, thread=aio)

    trio.run(main)


def test_trio_cancellation_cancels_asyncio_task(aio):
    events: list[str] = []

    async def work():
        try:
            await asyncio.sleep(30)
            events.append("finished")
        except asyncio.CancelledError:
            await asyncio.sleep(0.05)  # cleanup that must complete before trio returns
            events.append("cancelled")
            raise

    async def main():
        with trio.move_on_after(0.1) as scope:
            await run_in_asyncio(work, thread=aio)
        assert scope.cancelled_caught
        # the asyncio side finished its cleanup before the trio call returned
        assert events == ["cancelled"]

    start = time.monotonic()
    trio.run(main)
    assert time.monotonic() - start < 5


def test_trio_loop_not_blocked_while_waiting(aio):
    ticks = 0

    async def slow():
        await asyncio.sleep(0.3)
        return "done"

    async def ticker():
        nonlocal ticks
        while True:
            ticks += 1
            await trio.sleep(0.01)

    async def main():
        async with trio.open_nursery() as nursery:
            nursery.start_soon(ticker)
            assert await run_in_asyncio(slow, thread=aio) == "done"
            nursery.cancel_scope.cancel()

    trio.run(main)
    assert ticks >= 10


def test_many_concurrent_calls(aio):
    async def echo(i):
        await asyncio.sleep(0.001 * (i % 5))
        return i

    async def main():
        results = {}

        async def one(i):
            results[i] = await run_in_asyncio(echo, i, thread=aio)

        async with trio.open_nursery() as nursery:
            for i in range(200):
                nursery.start_soon(one, i)
        return results

    assert trio.run(main) == {i: i for i in range(200)}


def test_shutdown_and_restart():
    thread = AsyncioThread("restartable")

    async def where():
        return threading.current_thread().name

    async def main():
        return await run_in_asyncio(where, thread=thread)

    assert trio.run(main) == "restartable"
    thread.shutdown()
    assert not thread.running
    assert trio.run(main) == "restartable"
    thread.shutdown()
