"""Applying OCI layer tars onto a directory: entry kinds, metadata, whiteouts, hostile tars."""

from __future__ import annotations

import io
import os
import stat
import tarfile
from pathlib import Path

import pytest

from obdfuse.convert.apply import (
    MAX_EXTENDED_HEADER,
    ApplyError,
    UnsafeEntryError,
    apply_layer,
    detect_compression,
)
from obdfuse.errors import FormatError
from tests.convert.tarbuild import E, make_tar

BINARY_XATTR = bytes([1, 0, 0, 2, 0x20, 0, 0, 0, 0xFF, 0xFE, 0, 0])  # not UTF-8


def apply(entries: list[E], root: Path, compression: str = "tar"):
    return apply_layer(io.BytesIO(make_tar(entries, compression)), root, layer_name="test-layer")


def tree(root: Path) -> dict[str, tuple]:
    """A comparable snapshot of everything under root (not following symlinks)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath, name)
            st = p.lstat()
            rel = str(p.relative_to(root))
            if stat.S_ISREG(st.st_mode):
                extra = p.read_bytes()
            elif stat.S_ISLNK(st.st_mode):
                extra = os.readlink(p)
            else:
                extra = None
            out[rel] = (st.st_mode, st.st_uid, st.st_gid, extra)
    return out


@pytest.mark.parametrize("compression", ["tar", "gzip", "zstd"])
def test_every_entry_kind_and_its_metadata(tmp_path: Path, compression: str) -> None:
    root = tmp_path / "root"
    root.mkdir()
    entries = [
        E("./", "dir", mode=0o755, mtime=1_500_000_000),
        E("./etc", "dir", mode=0o755, mtime=1_400_000_000),
        E("./etc/passwd", data=b"root:x:0:0\n", mode=0o644, mtime=1_300_000_123.5),
        E("./bin/su", data=b"\x7fELF su", mode=0o4755, uid=0, gid=0),
        E("./bin/wall", data=b"wall", mode=0o2755, uid=0, gid=5),
        E("./tmp", "dir", mode=0o1777),
        E("./home/user", "dir", mode=0o700, uid=1000, gid=1000),
        E(
            "./home/user/notes",
            data=b"hi",
            mode=0o600,
            uid=1000,
            gid=1000,
            xattrs={"user.comment": b"hello", "trusted.bin": BINARY_XATTR},
        ),
        E(
            "./bin/ping",
            data=b"ping",
            mode=0o755,
            xattrs={"security.capability": BINARY_XATTR + bytes(8)},
        ),
        E("./etc/alias", "symlink", link="passwd"),
        E("./etc/dangling", "symlink", link="/nonexistent/abs"),
        E("./etc/passwd-hard", "hardlink", link="etc/passwd"),
        E("./run/fifo", "fifo", mode=0o620),
        E("./dev/null", "chr", mode=0o666, dev=(1, 3)),
        E("./dev/loopx", "blk", mode=0o660, dev=(7, 200)),
        E("./zeros", data=bytes(3 << 20) + b"tail"),
        E("./empty", data=b""),
    ]
    stats = apply(entries, root, compression)
    assert stats.entries == len(entries)

    assert (root / "etc/passwd").read_bytes() == b"root:x:0:0\n"
    st = (root / "etc/passwd").stat()
    assert st.st_mtime_ns == 1_300_000_123_500_000_000
    assert stat.S_IMODE((root / "bin/su").stat().st_mode) == 0o4755
    wall = (root / "bin/wall").stat()
    assert stat.S_IMODE(wall.st_mode) == 0o2755 and wall.st_gid == 5
    assert stat.S_IMODE((root / "tmp").stat().st_mode) == 0o1777
    home = (root / "home/user").stat()
    assert (home.st_uid, home.st_gid, stat.S_IMODE(home.st_mode)) == (1000, 1000, 0o700)
    assert os.getxattr(root / "home/user/notes", "user.comment") == b"hello"
    assert os.getxattr(root / "home/user/notes", "trusted.bin") == BINARY_XATTR
    assert os.getxattr(root / "bin/ping", "security.capability")[:12] == BINARY_XATTR
    assert os.readlink(root / "etc/alias") == "passwd"
    assert os.readlink(root / "etc/dangling") == "/nonexistent/abs"
    assert (root / "etc/passwd-hard").stat().st_ino == st.st_ino
    assert stat.S_ISFIFO((root / "run/fifo").lstat().st_mode)
    assert stat.S_IMODE((root / "run/fifo").lstat().st_mode) == 0o620
    dev = (root / "dev/null").lstat()
    assert stat.S_ISCHR(dev.st_mode) and os.major(dev.st_rdev) == 1 and os.minor(dev.st_rdev) == 3
    blk = (root / "dev/loopx").lstat()
    assert stat.S_ISBLK(blk.st_mode) and os.minor(blk.st_rdev) == 200
    zeros = root / "zeros"
    assert zeros.read_bytes() == bytes(3 << 20) + b"tail"
    assert zeros.stat().st_blocks * 512 < (1 << 20), "all-zero chunks should be holes"
    assert (root / "empty").read_bytes() == b""
    # directory mtimes are set after their children were created
    assert (root / "etc").stat().st_mtime == 1_400_000_000
    assert root.stat().st_mtime == 1_500_000_000


def test_whiteouts_opaque_dirs_and_replacements_across_layers(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    apply(
        [
            E("a/keep", data=b"keep"),
            E("a/gone", data=b"gone"),
            E("d/sub/deep", data=b"deep"),
            E("opq/lower1", data=b"1"),
            E("opq/lowerdir/x", data=b"x"),
            E("opq2/lower", data=b"l"),
            E("file-to-dir", data=b"f"),
            E("dir-to-file/inner", data=b"i"),
            E("link-to-dir", "symlink", link="a"),
        ],
        root,
    )
    apply(
        [
            E("a/.wh.gone", data=b""),
            E("d/.wh.sub", data=b""),
            E("opq/.wh..wh..opq", data=b""),
            E("opq/new", data=b"new"),
            # same layer: entry before the opaque marker must survive it
            E("opq2/mine", data=b"mine"),
            E("opq2/.wh..wh..opq", data=b""),
            E("file-to-dir", "dir", mode=0o750),
            E("dir-to-file", data=b"now a file"),
            E("link-to-dir", "dir", mode=0o755),
            # a whiteout of something this same layer adds must not remove it
            E("a/fresh", data=b"fresh"),
            E("a/.wh.fresh", data=b""),
            E("a/.wh.never-existed", data=b""),
        ],
        root,
    )
    t = tree(root)
    assert "a/keep" in t and "a/gone" not in t and "a/fresh" in t
    assert "d" in t and "d/sub" not in t
    assert sorted(k for k in t if k.startswith("opq/")) == ["opq/new"]
    assert sorted(k for k in t if k.startswith("opq2/")) == ["opq2/mine"]
    assert stat.S_ISDIR(t["file-to-dir"][0]) and stat.S_IMODE(t["file-to-dir"][0]) == 0o750
    assert t["dir-to-file"][3] == b"now a file"
    assert stat.S_ISDIR(t["link-to-dir"][0])
    assert (root / "a/keep").read_bytes() == b"keep", "replacing the symlink must not touch a/"
    assert not any(k.endswith(".wh..wh..opq") or "/.wh." in k for k in t)


def test_detects_compression_by_magic() -> None:
    assert detect_compression(make_tar([E("x")], "gzip")[:4]) == "gzip"
    assert detect_compression(make_tar([E("x")], "zstd")[:4]) == "zstd"
    assert detect_compression(make_tar([E("x")], "tar")[:4]) == "tar"


def test_parent_symlinks_resolve_inside_the_root(tmp_path: Path) -> None:
    """Absolute symlinks mean the image root, as the container will see them."""
    root = tmp_path / "root"
    root.mkdir()
    apply(
        [
            E("usr/lib", "dir"),
            E("lib", "symlink", link="/usr/lib"),
            E("rel", "symlink", link="usr/./lib/../lib"),
        ],
        root,
    )
    apply([E("lib/libc.so", data=b"c"), E("rel/libm.so", data=b"m")], root)
    assert (root / "usr/lib/libc.so").read_bytes() == b"c"
    assert (root / "usr/lib/libm.so").read_bytes() == b"m"


# ----------------------------------------------------------------------------- hostile tars


@pytest.fixture
def jail(tmp_path: Path):
    """A root nested in tmp_path, with a sentinel outside; yields (root, check_outside)."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "sentinel").write_bytes(b"untouched")
    root = tmp_path / "a" / "b" / "root"
    root.mkdir(parents=True)

    def snapshot() -> dict[str, tuple]:
        snap = tree(tmp_path)
        return {k: v for k, v in snap.items() if not k.startswith("a/b/root/")}

    before = snapshot()
    yield root, outside
    after = snapshot()
    # the root dir's own mode/mtime may change; nothing else outside it may
    before.pop("a/b/root", None)
    after.pop("a/b/root", None)
    assert after == before, "something outside the root changed"


HOSTILE = {
    "absolute path": [E("/abs-file", data=b"x")],
    "dotdot": [E("../../../outside/evil", data=b"x")],
    "dotdot in the middle": [E("ok/../../escape", data=b"x")],
    "relative symlink parent above root": [
        E("evil", "symlink", link="../../../outside"),
        E("evil/sentinel", data=b"pwned"),
    ],
    "chained symlink parents above root": [
        E("x", "dir"),
        E("x/up", "symlink", link=".."),
        E("x/up2", "symlink", link="up/.."),
        E("x/up2/up2/outside/sentinel", data=b"pwned"),
    ],
    "hardlink target dotdot": [E("h", "hardlink", link="../../../outside/sentinel")],
    "hardlink target absolute": [E("h", "hardlink", link="/etc/passwd")],
    "whiteout of dotdot": [E("a/.wh..", data=b"")],
    "symlink loop parent": [
        E("l1", "symlink", link="l2"),
        E("l2", "symlink", link="l1"),
        E("l1/x", data=b"x"),
    ],
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_entries_fail_clearly_and_write_nothing_outside(jail, case: str) -> None:
    root, _ = jail
    entries = HOSTILE[case]
    with pytest.raises((UnsafeEntryError, ApplyError)) as info:
        apply(entries, root)
    msg = str(info.value)
    assert "test-layer" in msg and "entry '" in msg, msg


def test_symlink_then_file_replaces_the_link_not_its_target(jail) -> None:
    root, outside = jail
    apply(
        [
            E("link", "symlink", link=str(outside / "sentinel")),
            E("dirlink", "symlink", link=str(outside)),
        ],
        root,
    )
    apply([E("link", data=b"pwned"), E("dirlink/sentinel", data=b"inside")], root)
    assert (root / "link").read_bytes() == b"pwned" and not (root / "link").is_symlink()
    # an absolute symlink used as a parent is resolved inside the root
    assert (root / str(outside).lstrip("/") / "sentinel").read_bytes() == b"inside"


def test_hardlink_to_a_symlink_links_the_symlink_itself(jail) -> None:
    root, outside = jail
    apply([E("s", "symlink", link=str(outside / "sentinel")), E("h", "hardlink", link="s")], root)
    assert os.readlink(root / "h") == str(outside / "sentinel")
    assert (root / "h").lstat().st_ino == (root / "s").lstat().st_ino


def test_huge_claimed_size_fails_before_writing(jail) -> None:
    root, _ = jail
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tf:
        ti = tarfile.TarInfo("big")
        ti.size = 1 << 60
        tf.addfile(ti)  # header only: the data never follows
    with pytest.raises(FormatError, match="more than the whole filesystem"):
        apply_layer(io.BytesIO(out.getvalue()), root, layer_name="test-layer")
    assert not (root / "big").exists()


def test_huge_extended_header_is_refused_without_buffering(jail) -> None:
    root, _ = jail
    hdr = tarfile.TarInfo("././@PaxHeader")
    hdr.type = tarfile.XHDTYPE
    hdr.size = MAX_EXTENDED_HEADER + 1
    raw = hdr.tobuf(format=tarfile.USTAR_FORMAT)
    with pytest.raises(FormatError, match="extended tar header"):
        apply_layer(io.BytesIO(raw), root, layer_name="test-layer")


def test_truncated_file_data_is_an_error(jail) -> None:
    root, _ = jail
    data = make_tar([E("f", data=os.urandom(100_000))])
    with pytest.raises(FormatError, match="test-layer"):
        apply_layer(io.BytesIO(data[:40_000]), root, layer_name="test-layer")


def test_garbage_is_not_a_tar(jail) -> None:
    root, _ = jail
    with pytest.raises(FormatError):
        apply_layer(io.BytesIO(os.urandom(4096)), root, layer_name="test-layer")


def test_an_opaque_root_keeps_lost_and_found(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "lost+found").mkdir(parents=True)
    apply([E("old", data=b"lower")], root)
    apply([E(".wh..wh..opq", data=b""), E("new", data=b"upper")], root)
    assert sorted(p.name for p in root.iterdir()) == ["lost+found", "new"]


def test_missing_hardlink_target_is_a_clear_error(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    with pytest.raises(ApplyError, match=r"entry 'h': hard link target 'nope' does not exist"):
        apply([E("h", "hardlink", link="nope")], root)


@pytest.mark.parametrize("fmt", ["gnu", "posix"])
def test_gnu_tar_sparse_files(tmp_path: Path, fmt: str) -> None:
    import subprocess

    src = tmp_path / "src"
    src.mkdir()
    with open(src / "sparse", "wb") as f:
        f.seek(3 << 20)
        f.write(b"middle")
        f.seek(9 << 20)
        f.write(b"end")
    archive = tmp_path / "sparse.tar"
    subprocess.run(
        ["tar", f"--format={fmt}", "--sparse", "-C", str(src), "-cf", str(archive), "sparse"],
        check=True,
    )
    root = tmp_path / "root"
    root.mkdir()
    with open(archive, "rb") as f:
        apply_layer(f, root)
    assert (root / "sparse").read_bytes() == (src / "sparse").read_bytes()
    assert (root / "sparse").stat().st_blocks * 512 < (1 << 20)
