"""`obdfuse build`'s first half: a directory tree through a tar stream into another tree."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from obdfuse.convert.apply import apply_layer
from obdfuse.convert.tardir import TreeTarStream
from tests.convert.images import assert_same_tree


def make_tree(root: Path) -> None:
    (root / "etc").mkdir(parents=True)
    (root / "etc/conf").write_bytes(b"conf")
    os.setxattr(root / "etc/conf", "user.k", b"v")
    os.setxattr(root / "etc/conf", "trusted.bin", bytes([0, 255, 1]))
    (root / "bin").mkdir()
    (root / "bin/su").write_bytes(b"su")
    os.chmod(root / "bin/su", 0o4755)
    os.link(root / "bin/su", root / "bin/su2")
    os.symlink("../etc/conf", root / "bin/conf-link")
    os.mkfifo(root / "fifo")
    os.mknod(root / "null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    (root / "home/u").mkdir(parents=True)
    os.chown(root / "home/u", 1000, 1001)
    os.chmod(root / "home/u", 0o700)
    (root / "big").write_bytes(os.urandom(3 << 20))
    os.utime(root / "etc/conf", ns=(1_000_000_000_123, 1_000_000_000_123))
    os.chmod(root, 0o751)


def test_tree_round_trips_through_the_tar_stream(tmp_path: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    make_tree(src)
    dst.mkdir()
    with TreeTarStream(src) as stream:
        stats = apply_layer(stream, dst, layer_name="tree")
    assert stats.files >= 3
    assert_same_tree(dst, src)
    assert stat.S_IMODE(dst.stat().st_mode) == 0o751  # the root's own metadata
    assert (dst / "bin/su").stat().st_ino == (dst / "bin/su2").stat().st_ino


def test_missing_directory_is_an_error(tmp_path: Path) -> None:
    import pytest

    with pytest.raises(NotADirectoryError):
        TreeTarStream(tmp_path / "nope")


def test_excluded_directories_are_left_out(tmp_path: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    (src / "keep").mkdir(parents=True)
    (src / "cache/work").mkdir(parents=True)
    (src / "cache/work/big").write_bytes(b"x")
    dst.mkdir()
    with TreeTarStream(src, exclude=(src / "cache",)) as stream:
        apply_layer(stream, dst)
    assert (dst / "keep").is_dir() and not (dst / "cache").exists()
