"""`daemonize` in a real fork: the parent never waits without a deadline for its daemon."""

from __future__ import annotations

import contextlib
import os
import signal
import time

import pytest

from obdfuse.daemon import daemonize
from obdfuse.errors import ObdfuseError


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


@contextlib.contextmanager
def _child_pid(path):
    """The pid the daemon wrote to `path`; killed at the end if it is somehow still there."""
    box: list[int] = []
    try:
        yield box
    finally:
        if path.exists():
            pid = int(path.read_text())
            box.append(pid)
            if not _gone(pid):
                os.kill(pid, signal.SIGKILL)
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(pid, 0)


@pytest.mark.parametrize("report", ["error", "close_pipe"])
def test_a_daemon_stuck_after_failing_is_killed_after_a_deadline(tmp_path, report):
    pid_file = tmp_path / "pid"

    def child(readiness) -> int:
        pid_file.write_text(str(os.getpid()))
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if report == "error":
            readiness.failed("cannot open the image")
        else:
            os.close(readiness._fd)  # the pipe closes with no word
        time.sleep(3600)  # stuck in cleanup
        return 1

    with _child_pid(pid_file):
        started = time.monotonic()
        with pytest.raises(ObdfuseError, match="did not exit within 1 s; killed it"):
            daemonize(child, log_file=tmp_path / "log", timeout=10, exit_timeout=1)
        assert time.monotonic() - started < 8
        assert _gone(int(pid_file.read_text()))


def test_a_daemon_that_fails_and_exits_is_reported_plainly(tmp_path):
    def child(readiness) -> int:
        readiness.failed("cannot open the image")
        return 1

    with pytest.raises(ObdfuseError) as raised:
        daemonize(child, log_file=tmp_path / "log", timeout=10, exit_timeout=5)
    assert str(raised.value) == "cannot open the image"
