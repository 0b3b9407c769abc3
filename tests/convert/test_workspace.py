"""The build work area always comes down: mounts, loop devices and files, on error and signals."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from obdfuse.convert.workspace import (
    Workspace,
    WorkspaceError,
    is_mounted,
    loop_devices_of,
    loop_table,
)

REPO = Path(__file__).resolve().parents[2]


def _ext4_image(path: Path) -> Path:
    with open(path, "wb") as f:
        f.truncate(64 << 20)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(path)], check=True, capture_output=True)
    return path


def test_close_unmounts_and_detaches_after_an_error(tmp_path: Path) -> None:
    image = _ext4_image(tmp_path / "fs.img")
    seen = {}
    with pytest.raises(RuntimeError, match="boom"), Workspace(tmp_path / "work") as ws:
        inner = ws.path / "disk.img"
        os.link(image, inner)
        device = ws.loop_attach(inner)
        root = ws.mount(device, ws.path / "root")
        (root / "file").write_text("x")
        seen.update(path=ws.path, inner=inner, root=root, device=device)
        assert is_mounted(root) and loop_devices_of(inner) == [device]
        raise RuntimeError("boom")
    assert not is_mounted(seen["root"])
    assert loop_devices_of(seen["inner"]) == []
    assert not seen["path"].exists()


def test_explicit_release_in_order(tmp_path: Path) -> None:
    image = _ext4_image(tmp_path / "fs.img")
    with Workspace(tmp_path / "work") as ws:
        device = ws.loop_attach(image)
        root = ws.mount(device, ws.path / "root")
        ws.umount(root)
        assert not is_mounted(root)
        ws.loop_detach(image)
        assert loop_devices_of(image) == []


def test_failing_mount_is_a_clear_error_and_cleans_up(tmp_path: Path) -> None:
    junk = tmp_path / "junk.img"
    junk.write_bytes(os.urandom(1 << 20))
    with pytest.raises(WorkspaceError, match="mount /dev/loop"), Workspace(tmp_path / "w") as ws:
        device = ws.loop_attach(junk)
        ws.mount(device, ws.path / "root")
    assert loop_devices_of(junk) == []


def _force_cleanup(work: Path, image: Path) -> None:
    """Last resort if a test failed half-way: nothing of ours may stay mounted."""
    for root in work.glob("*/root"):
        if is_mounted(root):
            subprocess.run(["umount", "-l", str(root)], check=False)
    for dev, file in loop_table():
        if file.startswith(str(work)):
            subprocess.run(["losetup", "-d", dev], check=False)


SCRIPT = """
import os, sys, time
from pathlib import Path
from obdfuse.convert.workspace import Workspace, signals_raise
with signals_raise(), Workspace(Path(sys.argv[1])) as ws:
    inner = ws.path / "disk.img"
    os.link(sys.argv[2], inner)
    dev = ws.loop_attach(inner)
    root = ws.mount(dev, ws.path / "root")
    print(ws.path, root, flush=True)
    time.sleep(60)
"""


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signals_tear_everything_down(tmp_path: Path, sig: signal.Signals) -> None:
    image = _ext4_image(tmp_path / "fs.img")
    proc = subprocess.Popen(
        [sys.executable, "-c", SCRIPT, str(tmp_path / "work"), str(image)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
    )
    try:
        line = proc.stdout.readline().split()
        assert line, proc.stderr.read()
        path, root = Path(line[0]), Path(line[1])
        assert is_mounted(root)
        time.sleep(0.2)
        proc.send_signal(sig)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        _force_cleanup(tmp_path / "work", image)
    assert proc.returncode != 0
    assert not is_mounted(root)
    assert [d for d, f in loop_table() if f.startswith(str(path))] == []
    assert not path.exists()


def test_a_killed_builders_leftovers_are_reaped_by_the_next_one(tmp_path: Path) -> None:
    image = _ext4_image(tmp_path / "fs.img")
    work = tmp_path / "work"
    proc = subprocess.Popen(
        [sys.executable, "-c", SCRIPT, str(work), str(image)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
    )
    try:
        line = proc.stdout.readline().split()
        assert line, proc.stderr.read()
        path, root = Path(line[0]), Path(line[1])
        proc.kill()  # no chance to clean up
        proc.wait()
        assert is_mounted(root) and loop_devices_of(path / "disk.img")
        with Workspace(work) as ws:  # the next build reaps the dead one's work area
            assert not is_mounted(root)
            assert [d for d, f in loop_table() if f.startswith(str(path))] == []
            assert not path.exists()
            assert ws.path.exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        _force_cleanup(work, image)


def test_a_live_builders_work_area_is_left_alone(tmp_path: Path) -> None:
    with Workspace(tmp_path) as first, Workspace(tmp_path) as second:
        assert first.path.exists() and second.path.exists()


def test_a_signal_during_close_is_deferred_until_everything_is_undone(tmp_path: Path) -> None:
    """With another thread alive, SIGINT must not cut the cleanup short (pthread_sigmask
    covers only the main thread); it is raised once every undo has run."""
    import threading

    stop = threading.Event()
    idle = threading.Thread(target=stop.wait)  # a thread with SIGINT unblocked
    idle.start()
    undone: list[str] = []
    try:
        ws = Workspace(tmp_path / "work")

        def interrupted_undo() -> None:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.2)  # the handler runs during this
            undone.append("second")

        ws._push("first", lambda: undone.append("first"))
        ws._push("second", interrupted_undo)
        with pytest.raises(KeyboardInterrupt, match="SIGINT"):
            ws.close()
        assert undone == ["second", "first"]
        assert not ws.path.exists()
    finally:
        stop.set()
        idle.join()
