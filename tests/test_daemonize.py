"""`daemonize` in a real fork: the parent never waits without a deadline for its daemon."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time

import pytest

from obdfuse.daemon import daemonize
from obdfuse.errors import ObdfuseError
from obdfuse.mountpoint import mounts


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


def test_a_daemon_not_ready_in_time_is_stopped_and_reaped(tmp_path):
    """On a readiness timeout the command waits (bounded) for the daemon to be gone."""
    pid_file = tmp_path / "pid"

    def child(readiness) -> int:
        pid_file.write_text(str(os.getpid()))
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        time.sleep(3600)
        return 0

    with _child_pid(pid_file):
        timed_out = pytest.raises(ObdfuseError, match=r"not ready within 0\.5 s; killed it")
        with timed_out:
            daemonize(child, log_file=tmp_path / "log", timeout=0.5, exit_timeout=1)
        assert _gone(int(pid_file.read_text()))


def test_a_killed_daemon_leaves_no_mount_behind(tmp_path):
    """A daemon that mounts but never reports ready (and ignores SIGTERM) is killed; its
    stale FUSE mount is detached, so the failed command leaves nothing mounted."""
    from obdfuse.daemon import MountSettings, run
    from obdfuse.device import RawFileDevice

    disk = tmp_path / "d.raw"
    disk.write_bytes(bytes(1 << 20))
    mountpoint = tmp_path / "mp"
    mountpoint.mkdir()
    pid_file, mounted = tmp_path / "pid", tmp_path / "mounted"

    class Silent:
        is_ready = False

        def ready(self) -> None:
            mounted.touch()  # the mount is live, but the parent is never told

        def failed(self, message: str) -> None:
            pass

    def child(readiness) -> int:
        pid_file.write_text(str(os.getpid()))
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})

        async def open_device():
            return RawFileDevice(disk)

        return run(open_device, MountSettings(mountpoint=mountpoint, image="x"), Silent())

    try:
        with (
            _child_pid(pid_file),
            pytest.raises(ObdfuseError, match=f"killed it .* detached its mount at {mountpoint}"),
        ):
            daemonize(child, log_file=tmp_path / "log", timeout=3, exit_timeout=1,
                      mountpoint=mountpoint)
        assert mounted.exists()
        assert str(mountpoint) not in mounts()  # not even a dead (ENOTCONN) mount
    finally:
        if str(mountpoint) in mounts():
            subprocess.run(["fusermount3", "-u", "-z", str(mountpoint)], check=False)
