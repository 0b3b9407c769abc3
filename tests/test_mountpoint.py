"""Mount point checks and unmounting (obdfuse/mountpoint.py), without a kernel mount."""

from __future__ import annotations

import time

import pytest

from obdfuse.errors import ObdfuseError
from obdfuse.mountpoint import fuse_unmount


def test_a_hung_fusermount_is_killed_after_the_timeout(tmp_path, monkeypatch):
    """fusermount3 stats the mount point; a hung daemon must not hang `obdfuse umount`."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "fusermount3"
    fake.write_text("#!/bin/sh\nexec sleep 60\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:/usr/bin:/bin")
    started = time.monotonic()
    with pytest.raises(ObdfuseError, match=r"did not finish within 0\.5 s.*--lazy"):
        fuse_unmount(tmp_path / "mp", timeout=0.5)
    assert time.monotonic() - started < 10


def test_fusermount_failures_are_one_clear_line(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "fusermount3"
    fake.write_text("#!/bin/sh\necho 'fusermount3: entry for /x not found in /etc/mtab' >&2\n"
                    "exit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:/usr/bin:/bin")
    with pytest.raises(ObdfuseError, match=r"cannot unmount .*/mp: fusermount3: entry for"):
        fuse_unmount(tmp_path / "mp")
