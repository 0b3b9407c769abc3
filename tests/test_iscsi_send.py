"""The target's threaded vectored send: every byte in order over a non-blocking socket,
and no thread left blocked once the connection is gone."""

from __future__ import annotations

import os
import socket
import threading
import time

import pytest
import trio

from obdfuse.iscsi.server import _send_in_thread


def _nonblocking_pair() -> tuple[socket.socket, socket.socket]:
    a, b = socket.socketpair()
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16384)  # force partial sends
    a.setblocking(False)
    return a, b


def test_threaded_send_delivers_every_part_in_order():
    a, b = _nonblocking_pair()
    parts = [os.urandom(n) for n in (48, 262144, 1, 700000, 48, 4096)]
    parts[1] = memoryview(parts[1])[1000:]  # views of read data are sent as they are
    expected = b"".join(bytes(p) for p in parts)
    got = bytearray()

    def drain() -> None:
        while len(got) < len(expected):
            time.sleep(0.001)  # a slow reader: the sender must wait for room
            chunk = b.recv(65536)
            if not chunk:
                break
            got.extend(chunk)

    reader = threading.Thread(target=drain)
    reader.start()
    try:
        _send_in_thread(a.fileno(), parts, threading.Event())
        reader.join(10)
        assert bytes(got) == expected
        a.send(b"x")  # the caller's socket is still open (only the duplicate closed)
    finally:
        a.close()
        b.close()


def test_threaded_send_gives_up_when_the_connection_stops():
    a, b = _nonblocking_pair()  # the peer never reads
    stopped = threading.Event()
    threading.Timer(0.3, stopped.set).start()
    t0 = time.monotonic()
    try:
        with pytest.raises(trio.ClosedResourceError):
            _send_in_thread(a.fileno(), [bytes(8 << 20)], stopped)
        assert time.monotonic() - t0 < 3
    finally:
        a.close()
        b.close()
