"""The shared end-to-end helpers keep their promise: nothing is left behind, even on failure."""

from __future__ import annotations

import os

import pytest

from obdfuse.runstate import process_start_time
from tests.support.loop import _backing_file, mkfs_ext4
from tests.support.mounts import MountKit


@pytest.fixture
def disk(tmp_path):
    image = tmp_path / "disk.raw"
    with open(image, "wb") as f:
        f.truncate(16 << 20)
    mkfs_ext4(image)
    return image


@pytest.mark.parametrize("crash", [False, True], ids=["test-fails", "daemon-killed"])
def test_kit_undoes_mounts_loops_and_daemons_after_a_failure(tmp_path, disk, crash):
    with pytest.raises(RuntimeError, match="half-way"), MountKit(tmp_path / "kit") as kit:
        m = kit.mount(disk, "--raw", "ro")
        device = kit.loop.attach(m.image_path, read_only=True)
        rootfs = kit.loop.mount(device, tmp_path / "rootfs", read_only=True)
        backing = _backing_file(device)
        assert backing and os.path.ismount(rootfs)
        if crash:
            m.kill()  # the FUSE mount is now dead under the loop device
        raise RuntimeError("the test failed half-way")
    assert not os.path.ismount(rootfs)
    assert _backing_file(device) != backing  # detached (or reused by someone else)
    assert not os.path.ismount(m.mountpoint)
    assert process_start_time(m.pid) is None
