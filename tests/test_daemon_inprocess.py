"""`obdfuse.daemon.serve` in this process: services and stat providers ride the mount."""

from __future__ import annotations

import json
import os
import signal
import subprocess

import pytest
import trio

from obdfuse.daemon import MountSettings, StderrReadiness, _single_cause, run, serve
from obdfuse.device import RawFileDevice
from obdfuse.errors import ObdfuseError


def test_services_run_beside_the_fuse_loop_and_stop_with_it(tmp_path):
    disk = tmp_path / "d.raw"
    disk.write_bytes(b"obdfuse!" * 1024)
    mountpoint = tmp_path / "mp"
    mountpoint.mkdir()
    seen: dict[str, object] = {}

    async def service(device) -> None:
        seen["device_head"] = await device.pread(0, 8)
        stat_text = await trio.to_thread.run_sync((mountpoint / ".obdfuse-stat").read_text)
        seen["stat"] = json.loads(stat_text)
        seen["image"] = await trio.to_thread.run_sync((mountpoint / "image").read_bytes)
        # An external unmount ends the mount; serve() returns and cancels us.
        await trio.to_thread.run_sync(
            lambda: subprocess.run(["fusermount3", "-u", str(mountpoint)], check=True)
        )
        await trio.sleep_forever()

    async def open_device():
        return RawFileDevice(disk)

    settings = MountSettings(
        mountpoint=mountpoint,
        image="test-image",
        services=[service],
        stat_providers=[lambda: {"extra": "yes"}],
        ready_timeout=20,
    )
    readiness = StderrReadiness()
    async def main() -> None:
        with trio.fail_after(60):
            await serve(open_device, settings, readiness)

    try:
        trio.run(main)
    finally:
        if os.path.ismount(mountpoint):
            subprocess.run(["fusermount3", "-u", "-z", str(mountpoint)], check=False)
    assert readiness.is_ready
    assert seen["device_head"] == b"obdfuse!"
    assert seen["image"] == disk.read_bytes()
    stat = seen["stat"]
    assert stat["extra"] == "yes" and stat["image"] == "test-image" and stat["pid"] == os.getpid()
    assert not os.path.ismount(mountpoint)


def test_a_signal_while_the_image_is_opening_stops_the_daemon(tmp_path):
    """A registry that never answers must not make SIGTERM wait."""
    mountpoint = tmp_path / "mp"
    mountpoint.mkdir()

    async def hanging_open():
        os.kill(os.getpid(), signal.SIGTERM)  # caught by the daemon's signal receiver
        await trio.sleep_forever()

    async def main() -> None:
        with trio.fail_after(20):
            await serve(hanging_open, MountSettings(mountpoint=mountpoint, image="x"),
                        StderrReadiness())

    with pytest.raises(ObdfuseError, match="stopped by SIGTERM while opening the image"):
        trio.run(main)
    assert not os.path.ismount(mountpoint)


def test_a_failing_service_stops_the_mount_with_its_own_message(tmp_path, caplog):
    disk = tmp_path / "d.raw"
    disk.write_bytes(bytes(4096))
    mountpoint = tmp_path / "mp"
    mountpoint.mkdir()

    async def broken_service(device) -> None:
        raise ObdfuseError("iscsi: port 3260 in use")

    async def open_device():
        return RawFileDevice(disk)

    settings = MountSettings(mountpoint=mountpoint, image="x", services=[broken_service])
    readiness = StderrReadiness()
    try:
        assert run(open_device, settings, readiness) == 1
    finally:
        if os.path.ismount(mountpoint):
            subprocess.run(["fusermount3", "-u", "-z", str(mountpoint)], check=False)
    assert readiness.is_ready  # failed after the mount was live: logged, not reported
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert errors == ["iscsi: port 3260 in use"]
    assert not os.path.ismount(mountpoint)


def test_a_flush_that_times_out_on_sigterm_is_not_waited_for_twice(tmp_path, monkeypatch):
    """SIGTERM's flush hit its deadline: unmount now, not after a second full deadline."""
    import obdfuse.daemon

    monkeypatch.setattr(obdfuse.daemon, "FLUSH_TIMEOUT", 1.0)
    disk = tmp_path / "d.raw"
    disk.write_bytes(bytes(1 << 20))
    mountpoint = tmp_path / "mp"
    mountpoint.mkdir()
    flushes = []

    class HangingFlush(RawFileDevice):
        async def flush(self) -> None:
            flushes.append(trio.current_time())
            await trio.sleep_forever()

    async def open_device():
        return HangingFlush(disk, read_only=False)

    async def stop(device) -> None:
        os.kill(os.getpid(), signal.SIGTERM)
        await trio.sleep_forever()

    settings = MountSettings(mountpoint=mountpoint, image="x", services=[stop], ready_timeout=20)

    async def main() -> float:
        with trio.fail_after(30), pytest.raises(ObdfuseError, match="flush did not finish"):
            try:
                await serve(open_device, settings, StderrReadiness())
            except ExceptionGroup as group:
                raise _single_cause(group) from None
        return trio.current_time() - flushes[0]

    try:
        elapsed = trio.run(main)
    finally:
        if os.path.ismount(mountpoint):
            subprocess.run(["fusermount3", "-u", "-z", str(mountpoint)], check=False)
    assert len(flushes) == 1
    assert elapsed < 1.9  # one deadline of 1 s, not two
