"""Build layer tars in tests: a tiny declarative builder over tarfile."""

from __future__ import annotations

import gzip
import io
import tarfile
from dataclasses import dataclass, field

import zstandard


@dataclass
class E:
    """One tar entry: kind is file, dir, symlink, hardlink, fifo, chr, blk."""

    name: str
    kind: str = "file"
    data: bytes = b""
    link: str = ""
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    mtime: float = 1_600_000_000
    xattrs: dict[str, bytes] = field(default_factory=dict)
    dev: tuple[int, int] = (0, 0)
    size: int | None = None  # override the header size (hostile tars)


_TYPES = {
    "file": tarfile.REGTYPE,
    "dir": tarfile.DIRTYPE,
    "symlink": tarfile.SYMTYPE,
    "hardlink": tarfile.LNKTYPE,
    "fifo": tarfile.FIFOTYPE,
    "chr": tarfile.CHRTYPE,
    "blk": tarfile.BLKTYPE,
}


def make_tar(entries: list[E], compression: str = "tar") -> bytes:
    """A PAX tar of `entries`, optionally gzip- or zstd-compressed."""
    out = io.BytesIO()
    with tarfile.open(
        fileobj=out, mode="w", format=tarfile.PAX_FORMAT, encoding="utf-8", errors="surrogateescape"
    ) as tf:
        for e in entries:
            ti = tarfile.TarInfo(e.name)
            ti.type = _TYPES[e.kind]
            ti.mode = e.mode
            ti.uid, ti.gid = e.uid, e.gid
            ti.mtime = e.mtime
            ti.linkname = e.link
            ti.devmajor, ti.devminor = e.dev
            ti.pax_headers = {
                f"SCHILY.xattr.{k}": v.decode("utf-8", "surrogateescape")
                for k, v in e.xattrs.items()
            }
            if e.kind == "file":
                ti.size = len(e.data)
                tf.addfile(ti, io.BytesIO(e.data))
            else:
                tf.addfile(ti)
    raw = out.getvalue()
    if compression == "gzip":
        return gzip.compress(raw)
    if compression == "zstd":
        return zstandard.ZstdCompressor().compress(raw)
    return raw
