"""`obdfuse mount`/`umount` end to end on real FUSE, with plain disk image files (--raw).

These pin the front end (ImageFS, daemon life, CLI errors) independently of
the layer stack; tests/test_mount_image.py covers real overlaybd images.
"""

from __future__ import annotations

import errno
import json
import os
import random
import signal
import socket
import subprocess

import pytest

from obdfuse.cli.mount_cmd import _record_from_stat_file
from obdfuse.runstate import process_start_time
from tests.support.loop import mkfs_ext4, tree_snapshot
from tests.support.mounts import OBDFUSE, obdfuse_env


def _populate(root):
    (root / "dir" / "sub").mkdir(parents=True)
    (root / "dir" / "hello.txt").write_text("hello\n")
    (root / "dir" / "sub" / "blob").write_bytes(os.urandom(300_000))
    (root / "dir" / "link").symlink_to("hello.txt")
    os.chmod(root / "dir" / "hello.txt", 0o640)


@pytest.fixture
def ext4_raw(tmp_path):
    """A 64 MiB raw ext4 image holding a small tree; returns (image, tree_snapshot)."""
    root = tmp_path / "tree"
    _populate(root)
    image = tmp_path / "disk.raw"
    with open(image, "wb") as f:
        f.truncate(64 << 20)
    mkfs_ext4(image, root=root)
    return image, tree_snapshot(root)


def test_read_only_mount_serves_the_disk_through_loop_and_ext4(mounts, tmp_path, ext4_raw):
    image, tree = ext4_raw
    m = mounts.mount(image, "--raw", "ro")
    assert os.listdir(m.mountpoint) == ["image"]
    st = os.stat(m.image_path)
    assert st.st_size == 64 << 20
    assert st.st_ino == 2 and os.stat(m.mountpoint).st_ino == 1
    dev = os.stat(m.mountpoint).st_dev
    bdi = f"/sys/class/bdi/{os.major(dev)}:{os.minor(dev)}/read_ahead_kb"
    with open(bdi) as f:
        assert int(f.read()) == 4096  # raised from the kernel's 128 KiB
    assert 0 < st.st_blocks * 512 <= os.stat(image).st_blocks * 512 + 4096
    assert m.image_path.read_bytes() == image.read_bytes()
    with pytest.raises(OSError) as exc:
        os.open(m.image_path, os.O_RDWR)
    assert exc.value.errno in (errno.EROFS, errno.EACCES)

    for change in (lambda: (m.mountpoint / "new").write_bytes(b"x"),
                   lambda: m.image_path.unlink(),
                   lambda: os.rename(m.image_path, m.mountpoint / "other"),
                   lambda: (m.mountpoint / "dir").mkdir()):
        with pytest.raises(OSError) as exc:
            change()
        assert exc.value.errno == errno.EPERM
    assert os.listdir(m.mountpoint) == ["image"]

    info = m.stat()
    assert info["pid"] == m.pid and info["read_only"] is True and info["size"] == 64 << 20
    assert info["counters"]["bytes_read"] >= 64 << 20

    dev = mounts.loop.attach(m.image_path, read_only=True)
    subprocess.run(["e2fsck", "-fn", dev], check=True, capture_output=True)
    rootfs = mounts.loop.mount(dev, tmp_path / "rootfs", read_only=True)
    assert tree_snapshot(rootfs) == tree


def test_writes_reach_the_device_including_unaligned_ones(mounts, tmp_path):
    size = 1 << 20
    disk = tmp_path / "rw.raw"
    disk.write_bytes(b"\0" * size)
    model = bytearray(size)
    m = mounts.mount(disk, "--raw", "rw")
    rng = random.Random(7)
    fd = os.open(m.image_path, os.O_RDWR)
    try:
        for _ in range(200):
            off = rng.randrange(size - 1)
            data = rng.randbytes(min(rng.randrange(1, 20_000), size - off))
            assert os.pwrite(fd, data, off) == len(data)
            model[off : off + len(data)] = data
        os.fsync(fd)
        assert os.pread(fd, size, 0) == model
        with pytest.raises(OSError) as exc:
            os.pwrite(fd, b"x", size)
        assert exc.value.errno in (errno.ENOSPC, errno.EFBIG)
        with pytest.raises(OSError) as exc:
            os.ftruncate(fd, size // 2)
        assert exc.value.errno == errno.EPERM
    finally:
        os.close(fd)
    assert m.stat()["counters"]["unaligned_writes"] > 0
    assert m.umount().returncode == 0
    assert disk.read_bytes() == model


def test_foreground_notifies_systemd_and_sigterm_flushes_and_exits_0(mounts, tmp_path):
    size = 1 << 20
    disk = tmp_path / "rw.raw"
    disk.write_bytes(b"\0" * size)
    notify_path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        notify.bind(str(notify_path))
        notify.settimeout(30)
        m = mounts.mount(disk, "--raw", "rw", foreground=True,
                         env={"NOTIFY_SOCKET": str(notify_path)})
        ready = notify.recv(4096).decode()
        assert "READY=1" in ready.splitlines()
        assert os.path.getsize(m.image_path) == size  # ready means live
        with open(m.image_path, "r+b", buffering=0) as f:
            f.write(b"A" * 4096)  # written, not fsync'ed: SIGTERM must flush it
        m.signal(signal.SIGTERM)
        assert m.wait_exit() == 0
        assert "STOPPING=1" in notify.recv(4096).decode().splitlines()
    assert not os.path.ismount(m.mountpoint)
    assert disk.read_bytes()[:4096] == b"A" * 4096
    assert "flushing and unmounting" in m.log()


def test_umount_waits_until_the_daemon_has_exited(mounts, tmp_path, ext4_raw):
    image, _ = ext4_raw
    m = mounts.mount(image, "--raw", "ro")
    start = process_start_time(m.pid)
    assert start is not None
    records = list(mounts.run_dir.glob("*.json"))
    assert [json.loads(r.read_text())["pid"] for r in records] == [m.pid]

    proc = m.umount()
    assert proc.returncode == 0, proc.stderr
    assert process_start_time(m.pid) is None  # exited before umount returned
    assert not os.path.ismount(m.mountpoint)
    assert not list(mounts.run_dir.glob("*.json"))
    again = m.umount()
    assert again.returncode == 1 and "is not mounted" in again.stderr


def test_umount_refuses_while_a_loop_device_holds_the_image(mounts, ext4_raw):
    image, _ = ext4_raw
    m = mounts.mount(image, "--raw", "ro")
    mounts.loop.attach(m.image_path, read_only=True)
    proc = m.umount(timeout=5)
    assert proc.returncode == 1
    assert "busy" in proc.stderr and "losetup -j" in proc.stderr
    assert proc.stderr.count("\n") == 1
    assert m.stat()["pid"] == m.pid  # still serving


def _mount_cli(mounts, *args, **env):
    return mounts.obdfuse("mount", "--timeout", "20", *args, **env)


def _one_line_error(proc, expected):
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.startswith("obdfuse: error: ")
    assert expected in proc.stderr, proc.stderr


def test_mount_errors_are_one_clear_line(mounts, tmp_path, ext4_raw):
    image, _ = ext4_raw
    missing = tmp_path / "nowhere"
    _one_line_error(_mount_cli(mounts, "--raw", "ro", str(image), str(missing)),
                    f"mount point {missing} does not exist")

    full = tmp_path / "full"
    full.mkdir()
    (full / "x").write_text("x")
    _one_line_error(_mount_cli(mounts, "--raw", "ro", str(image), str(full)), "is not empty")

    empty = tmp_path / "empty"
    empty.mkdir()
    _one_line_error(_mount_cli(mounts, "--raw", "ro", str(tmp_path / "no.img"), str(empty)),
                    "No such file or directory")
    assert not os.path.ismount(empty)

    m = mounts.mount(image, "--raw", "ro")
    _one_line_error(_mount_cli(mounts, "--raw", "ro", str(image), str(m.mountpoint)),
                    "is already mounted (fuse.obdfuse)")


def test_a_crashed_daemon_leaves_a_stale_mount_that_umount_clears(mounts, ext4_raw):
    image, _ = ext4_raw
    m = mounts.mount(image, "--raw", "ro")
    m.kill()
    proc = _mount_cli(mounts, "--raw", "ro", str(image), str(m.mountpoint))
    _one_line_error(proc, "already mounted")
    assert m.umount().returncode == 0
    assert not os.path.ismount(m.mountpoint)
    mounts.mount(image, "--raw", "ro", mountpoint=m.mountpoint)  # usable again


def _run_isolated(prefix, args, run_dir):
    return subprocess.run([*prefix, *OBDFUSE, *args], capture_output=True, text=True,
                          env=obdfuse_env(run_dir), timeout=60, check=False)


def test_no_fuse_device(tmp_path, ext4_raw, mounts):
    """A mount namespace where /dev/fuse is a plain file: the real check must catch it."""
    image, _ = ext4_raw
    mp = tmp_path / "mp"
    mp.mkdir()
    fake = tmp_path / "fake-fuse"
    fake.touch()
    script = f'mount --bind "{fake}" /dev/fuse && exec "$@"'
    proc = _run_isolated(["unshare", "-m", "sh", "-c", script, "sh"],
                         ["mount", "--foreground", "--raw", "ro", str(image), str(mp)],
                         mounts.run_dir)
    _one_line_error(proc, "/dev/fuse is not the FUSE character device")

    # And a /dev without it at all (an empty tmpfs over /dev in the namespace).
    script = 'mount -t tmpfs none /dev && exec "$@"'
    proc = _run_isolated(["unshare", "-m", "sh", "-c", script, "sh"],
                         ["mount", "--foreground", "--raw", "ro", str(image), str(mp)],
                         mounts.run_dir)
    _one_line_error(proc, "no FUSE device /dev/fuse")


def test_not_permitted_without_cap_sys_admin(tmp_path, ext4_raw, mounts):
    """Like an unprivileged container: the kernel (via fusermount3) refuses the mount."""
    image, _ = ext4_raw
    mp = tmp_path / "mp"
    mp.mkdir()
    drop_caps = ["setpriv", "--bounding-set=-all", "--inh-caps=-all", "--ambient-caps=-all"]
    proc = _run_isolated(drop_caps, ["mount", "--raw", "ro", str(image), str(mp)],
                         mounts.run_dir)
    _one_line_error(proc, "Operation not permitted")
    assert not os.path.ismount(mp)


def test_umount_finds_a_daemon_started_with_another_run_dir(mounts, tmp_path, ext4_raw):
    image, _ = ext4_raw
    m = mounts.mount(image, "--raw", "ro", env={"OBDFUSE_RUN_DIR": str(tmp_path / "other")})
    assert not list(mounts.run_dir.glob("*.json"))  # the kit's run dir knows nothing of it
    found = _record_from_stat_file(m.mountpoint)
    assert found is not None and found.pid == m.pid and found.alive()
    proc = m.umount()
    assert proc.returncode == 0, proc.stderr
    assert process_start_time(m.pid) is None


def test_umount_leaves_other_filesystems_alone(mounts, tmp_path):
    target = mounts.loop.mount("tmpfs", tmp_path / "tmpfs", options="size=1m", fstype="tmpfs")
    proc = mounts.obdfuse("umount", str(target))
    _one_line_error(proc, "is not an obdfuse mount (tmpfs)")
    assert os.path.ismount(target)


def test_size_without_upper_is_a_usage_error(mounts, tmp_path, ext4_raw):
    image, _ = ext4_raw
    (tmp_path / "mp").mkdir()
    proc = mounts.obdfuse("mount", "--size", "1G", str(image), str(tmp_path / "mp"))
    assert proc.returncode == 2 and "--size" in proc.stderr and "--upper" in proc.stderr


def test_umount_timeout_also_bounds_a_hung_fusermount(mounts, tmp_path, ext4_raw):
    """`umount --timeout` bounds the fusermount3 call too, not only the daemon's exit."""
    image, _ = ext4_raw
    m = mounts.mount(image, "--raw", "ro")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "fusermount3").write_text("#!/bin/sh\nexec sleep 60\n")
    (bin_dir / "fusermount3").chmod(0o755)
    proc = mounts.obdfuse("umount", "--timeout", "1", str(m.mountpoint),
                          PATH=f"{bin_dir}:{os.environ['PATH']}")
    assert proc.returncode == 1
    assert "did not finish within 1 s" in proc.stderr, proc.stderr
    assert m.umount().returncode == 0  # the real fusermount3 still works
