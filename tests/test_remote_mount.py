"""End to end: `obdfuse push` a real ext4 image, `obdfuse mount 127.0.0.1:PORT/sample:latest`,
loop-mount it, read lazily, check `obdfuse stat`, remount by digest from the cache."""

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess

import pytest

from tests.support.images import make_layer
from tests.support.loop import mkfs_ext4, tree_snapshot

MiB = 1 << 20
IMAGE = 256 * MiB


def sha256_file(path, step=4 * MiB):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while piece := f.read(step):
            h.update(piece)
    return h.hexdigest()


def build_image(tmp_path):
    """A 256 MiB ext4 image holding 96 MiB of incompressible files, as an overlaybd layer."""
    root = tmp_path / "tree"
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "hostname").write_text("lazy-obdfuse\n")
    rng = random.Random(3)
    (root / "data").mkdir()
    for i in range(48):
        (root / "data" / f"blob{i:02d}").write_bytes(rng.randbytes(2 * MiB))
    raw = tmp_path / "image.ext4"
    with open(raw, "wb") as f:
        f.truncate(IMAGE)
    mkfs_ext4(raw, root=root)
    writes = []
    with open(raw, "rb") as f:
        for off in range(0, IMAGE, MiB):
            piece = f.read(MiB)
            if piece.count(0) != len(piece):
                writes.append((off, piece))
    layer = make_layer(tmp_path / "layer", "image", IMAGE, writes)
    return raw, layer, tree_snapshot(root)


@pytest.mark.slow
def test_mount_image_reference_end_to_end(mounts, registry, tmp_path):
    raw, layer, expected_tree = build_image(tmp_path)
    pushed = mounts.obdfuse("push", str(layer), f"{registry.host}/sample:latest")
    assert pushed.returncode == 0, pushed.stderr
    by_digest = pushed.stdout.strip()
    cache = tmp_path / "cache"

    m = mounts.mount(f"{registry.host}/sample:latest", "--cache-dir", str(cache))
    assert os.path.getsize(m.image_path) == IMAGE
    dev = mounts.loop.attach(m.image_path, read_only=True)
    rootfs = mounts.loop.mount(dev, tmp_path / "rootfs", read_only=True)
    assert (rootfs / "etc" / "hostname").read_text() == "lazy-obdfuse\n"
    stat = mounts.obdfuse("stat", str(m.mountpoint), "--summary")
    assert stat.returncode == 0, stat.stderr
    summary = json.loads(stat.stdout)
    layer_size = layer.stat().st_size
    assert summary["image_bytes"] == layer_size
    print("after mount + one small file:", summary)
    assert 0 < summary["bytes_fetched"] <= layer_size // 4, summary
    assert tree_snapshot(rootfs) == expected_tree
    mounts.loop.umount(rootfs)
    mounts.loop.detach(dev)
    assert sha256_file(m.image_path) == sha256_file(raw)
    full = m.stat()["remote"][0]["layers"][0]
    assert full["chunks_cached"] == full["chunks"]
    assert m.umount().returncode == 0

    # a new daemon on the same cache, by digest: everything comes from the cache
    m2 = mounts.mount(by_digest, "--cache-dir", str(cache))
    assert sha256_file(m2.image_path) == sha256_file(raw)
    again = m2.stat()["remote"][0]["layers"][0]
    assert again["bytes_fetched"] == 0 and again["requests"] == 0, again
    assert m2.umount().returncode == 0


def test_mount_of_missing_image_fails_cleanly(mounts, registry, tmp_path):
    from tests.support.mounts import ObdfuseMount

    m = ObdfuseMount(f"{registry.host}/nothing:here", tmp_path / "mnt",
                     ("--cache-dir", str(tmp_path / "cache")), run_dir=mounts.run_dir)
    mounts.mounts.append(m)
    with pytest.raises(Exception, match="not found"):
        m.start(timeout=60)
    assert subprocess.run(["mountpoint", "-q", str(tmp_path / "mnt")]).returncode != 0


def _pread_file(path, offset, length):
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.pread(fd, length, offset)
    finally:
        os.close(fd)


@pytest.mark.slow
def test_registry_outage_through_fuse(mounts, registry, tmp_path):
    """fail: EIO within the deadline and the daemon lives on; wait: the read resumes."""
    import errno
    import threading
    import time

    rng = random.Random(9)
    writes = [(off, rng.randbytes(MiB)) for off in range(0, 32 * MiB, MiB)]
    layer = make_layer(tmp_path / "layer", "img", 32 * MiB, writes)
    assert mounts.obdfuse("push", str(layer), f"{registry.host}/sample:latest").returncode == 0
    want = b"".join(piece for _, piece in writes)

    m = mounts.mount(f"{registry.host}/sample:latest", "--cache-dir", str(tmp_path / "c1"),
                     "--registry-timeout", "2", "--chunk-size", "256K")
    assert _pread_file(m.image_path, 0, 4096) == want[:4096]
    registry.stop()
    start = time.monotonic()
    with pytest.raises(OSError) as exc:
        _pread_file(m.image_path, 20 * MiB, 4096)
    assert exc.value.errno == errno.EIO
    assert time.monotonic() - start < 15
    registry.restart()
    assert _pread_file(m.image_path, 20 * MiB, 4096) == want[20 * MiB:20 * MiB + 4096]
    assert m.umount().returncode == 0

    w = mounts.mount(f"{registry.host}/sample:latest", "--cache-dir", str(tmp_path / "c2"),
                     "--registry-timeout", "2", "--on-registry-error", "wait",
                     "--chunk-size", "256K")
    assert _pread_file(w.image_path, 0, 4096) == want[:4096]
    registry.stop()
    result = {}

    def reader():
        try:
            result["data"] = _pread_file(w.image_path, 25 * MiB, 4096)
        except OSError as e:
            result["error"] = e

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    thread.join(4.0)  # twice the fail deadline: still waiting, no error
    assert thread.is_alive() and not result
    registry.restart()
    thread.join(30)
    assert result.get("data") == want[25 * MiB:25 * MiB + 4096], result
    assert w.umount().returncode == 0
