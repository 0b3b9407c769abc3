"""Acceptance: overlaybd images through `obdfuse mount` on real FUSE, loop devices and ext4."""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import signal
import subprocess

import pytest

from tests.support.loop import mkfs_ext4, tree_snapshot

SECTOR = 512


def _empty_config(tmp_path):
    config = tmp_path / "config.v1.json"
    config.write_text(json.dumps({"lowers": []}))
    return config


@pytest.mark.slow
def test_reference_ext4_layer_mounts_read_only(mounts, samples, tmp_path):
    m = mounts.mount(samples / "layers" / "ext4_64")
    assert os.path.getsize(m.image_path) == 64 << 30
    assert m.stat()["read_only"] is True
    with pytest.raises(OSError) as exc:
        os.open(m.image_path, os.O_RDWR)
    assert exc.value.errno in (errno.EROFS, errno.EACCES)
    dev = mounts.loop.attach(m.image_path, read_only=True)
    fsck = subprocess.run(["e2fsck", "-fn", dev], capture_output=True, text=True, check=False)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    rootfs = mounts.loop.mount(dev, tmp_path / "rootfs", read_only=True)
    assert "lost+found" in os.listdir(rootfs)


def _write_tree(root):
    rng = random.Random(42)
    (root / "etc").mkdir()
    (root / "etc" / "hostname").write_text("obdfuse\n")
    os.chmod(root / "etc" / "hostname", 0o600)
    (root / "bin").mkdir(mode=0o750)
    os.chmod(root / "bin", 0o750)
    tool = root / "bin" / "tool"
    tool.write_bytes(rng.randbytes(3 << 20))
    os.chmod(tool, 0o755)
    (root / "bin" / "alias").symlink_to("tool")
    (root / "dangling").symlink_to("/nowhere/at/all")
    deep = root / "a" / "b" / "c"
    deep.mkdir(parents=True)
    for i in range(50):
        (deep / f"f{i}").write_bytes(rng.randbytes(rng.randrange(0, 20_000)))
    (root / "sparse").write_bytes(b"")
    with open(root / "sparse", "r+b") as f:
        f.seek(10 << 20)
        f.write(b"end")


@pytest.mark.slow
def test_writable_mount_over_nothing_then_commit_and_mount_read_only(mounts, tmp_path):
    upper = tmp_path / "upper"
    m = mounts.mount(_empty_config(tmp_path), "--upper", str(upper), "--size", "1G")
    assert os.path.getsize(m.image_path) == 1 << 30
    assert m.stat()["read_only"] is False
    mkfs_ext4(m.image_path)
    dev = mounts.loop.attach(m.image_path)
    rootfs = mounts.loop.mount(dev, tmp_path / "rootfs")
    _write_tree(rootfs)
    expected = tree_snapshot(rootfs)
    subprocess.run(["sync"], check=True)
    mounts.loop.umount(rootfs)
    mounts.loop.detach(dev)
    assert os.stat(m.image_path).st_blocks > 0
    proc = m.umount()
    assert proc.returncode == 0, proc.stderr

    layer = tmp_path / "layer.zfile"
    proc = mounts.obdfuse("layer", "commit", "--zfile", str(upper), str(layer))
    assert proc.returncode == 0, proc.stderr

    ro = mounts.mount(layer)
    assert ro.stat()["read_only"] is True
    dev = mounts.loop.attach(ro.image_path, read_only=True)
    subprocess.run(["e2fsck", "-fn", dev], check=True, capture_output=True)
    rootfs = mounts.loop.mount(dev, tmp_path / "committed", read_only=True)
    assert tree_snapshot(rootfs) == expected


def _check_against_model(data: bytes, model: bytearray, maybe: dict[int, set[bytes]]) -> None:
    """Every sector equals the durable model, or one of its un-fsync'ed versions."""
    assert len(data) == len(model)
    for sector in range(len(model) // SECTOR):
        got = data[sector * SECTOR : (sector + 1) * SECTOR]
        want = bytes(model[sector * SECTOR : (sector + 1) * SECTOR])
        if got != want:
            assert got in maybe.get(sector, ()), f"sector {sector}: lost an fsync'ed write"


@pytest.mark.slow
def test_fsynced_writes_survive_kill_9(mounts, tmp_path):
    size = 8 << 20
    upper = tmp_path / "upper"
    config = _empty_config(tmp_path)
    model = bytearray(size)
    rng = random.Random(1234)
    mountpoint = tmp_path / "mp"
    maybe: dict[int, set[bytes]] = {}
    for _ in range(8):
        m = mounts.mount(config, "--upper", str(upper), "--size", str(size),
                         mountpoint=mountpoint)
        fd = os.open(m.image_path, os.O_RDWR)
        try:
            # What the previous daemon was killed with must all be there.
            found = os.pread(fd, size, 0)
            _check_against_model(found, model, maybe)
            model[:] = found  # un-fsync'ed writes that did survive are now the state
            for _ in range(rng.randrange(5, 40)):
                if rng.random() < 0.7:  # sector-aligned, like a loop device
                    off = rng.randrange(size // SECTOR) * SECTOR
                    length = min(rng.randrange(1, 64) * SECTOR, size - off)
                else:  # anything a program might pwrite
                    off = rng.randrange(size - 1)
                    length = min(rng.randrange(1, 40_000), size - off)
                data = rng.randbytes(length)
                assert os.pwrite(fd, data, off) == length
                model[off : off + length] = data
            os.fsync(fd)
            # Unsynced writes may or may not survive, sector by sector.
            maybe = {}
            for _ in range(rng.randrange(0, 4)):
                off = rng.randrange(size // SECTOR) * SECTOR
                data = rng.randbytes(min(8 * SECTOR, size - off))
                os.pwrite(fd, data, off)
                for i in range(0, len(data), SECTOR):
                    maybe.setdefault((off + i) // SECTOR, set()).add(data[i : i + SECTOR])
        finally:
            os.close(fd)
        m.kill()
        m.cleanup()  # clears the dead mount the crash left behind
    final = mounts.mount(config, "--upper", str(upper), mountpoint=mountpoint)
    _check_against_model(final.image_path.read_bytes(), model, maybe)


def test_sigterm_flushes_the_upper_layer_and_exits_0(mounts, tmp_path):
    upper = tmp_path / "upper"
    config = _empty_config(tmp_path)
    m = mounts.mount(config, "--upper", str(upper), "--size", "16M", foreground=True)
    payload = os.urandom(1 << 20)
    with open(m.image_path, "r+b", buffering=0) as f:
        f.seek(3 << 20)
        f.write(payload)
    m.signal(signal.SIGTERM)
    assert m.wait_exit() == 0
    assert not os.path.ismount(m.mountpoint)
    again = mounts.mount(config, "--upper", str(upper))
    with open(again.image_path, "rb") as f:
        f.seek(3 << 20)
        assert f.read(1 << 20) == payload


def _one_line_error(proc, expected):
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert expected in proc.stderr, proc.stderr


def test_image_errors_are_one_clear_line(mounts, tmp_path):
    mp = tmp_path / "mp"
    mp.mkdir()
    missing = tmp_path / "missing.json"
    _one_line_error(mounts.obdfuse("mount", str(missing), str(mp)), str(missing))

    upper = tmp_path / "upper"
    config = _empty_config(tmp_path)
    m = mounts.mount(config, "--upper", str(upper), "--size", "64M", mountpoint=mp)
    assert m.umount().returncode == 0
    proc = mounts.obdfuse("mount", "--upper", str(upper), "--size", "128M", str(config), str(mp))
    _one_line_error(proc, "virtual size")
    assert not os.path.ismount(mp)


@pytest.mark.slow
def test_corrupt_layer_reads_fail_with_eio_and_the_daemon_keeps_serving(
    mounts, samples, tmp_path
):
    source = samples / "layers" / "l1.commit.lz4.zfile"
    layer = tmp_path / "l1.zfile"
    shutil.copy(source, layer)
    size = layer.stat().st_size
    with open(layer, "r+b") as f:  # flip bytes inside compressed blocks of file data
        for spot in range(size // 5, size * 3 // 5, size // 20):
            f.seek(spot)
            chunk = f.read(16)
            f.seek(spot)
            f.write(bytes(b ^ 0xFF for b in chunk))
    good = mounts.mount(source)
    bad = mounts.mount(layer)
    failed = 0
    total = os.path.getsize(good.image_path)
    with open(good.image_path, "rb") as g, open(bad.image_path, "rb", buffering=0) as b:
        pos = 0
        while pos < total:
            want = os.pread(g.fileno(), 1 << 20, pos)
            try:
                got = os.pread(b.fileno(), len(want), pos)
            except OSError as exc:
                assert exc.errno == errno.EIO
                failed += 1
                pos += 4096  # skip the page that cannot be read
                continue
            # A read may stop short before a bad page, but never returns wrong bytes.
            assert got and got == want[: len(got)], f"wrong bytes at {pos}"
            pos += len(got)
    assert failed >= 1
    assert bad.stat()["counters"]["errors"] >= failed  # still serving
    errors = [line for line in bad.log().splitlines() if "ERROR obdfuse.fs" in line]
    assert errors and len(errors) <= bad.stat()["counters"]["errors"]


def test_relative_paths_are_taken_from_the_callers_directory(mounts, tmp_path):
    _empty_config(tmp_path)
    (tmp_path / "mp").mkdir()
    m = mounts.mount("config.v1.json", "--upper", "upper", "--size", "16M",
                     mountpoint="mp", cwd=tmp_path)
    with open(m.image_path, "r+b") as f:
        f.write(b"relative")
    assert m.umount().returncode == 0
    assert (tmp_path / "upper" / "data").is_file()
    again = mounts.mount(tmp_path / "config.v1.json", "--upper", str(tmp_path / "upper"))
    assert again.image_path.read_bytes()[:8] == b"relative"
