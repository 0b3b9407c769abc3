"""Small local-file primitives every room shares: whole writes, hole punching, atomic outputs.

Owns: `pread_exact` and `pwrite_all` (loop over short reads/writes), `punch_hole`
(fallocate PUNCH_HOLE) and `atomic_output` (a temporary file beside the target,
fsync'ed and renamed into place only on success, removed on failure). No format knowledge.
"""

from __future__ import annotations

import contextlib
import functools
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from obdfuse.errors import FormatError

OUTPUT_MODE = 0o644  # mode of files made by atomic_output (mkstemp's own is 0600)


def pread_exact(fd: int, length: int, offset: int, *, name: str) -> bytes:
    """Exactly `length` bytes at `offset`; FormatError if the file ends first (it shrank)."""
    data = os.pread(fd, length, offset)
    while len(data) < length:  # short reads only happen on odd filesystems or at EOF
        more = os.pread(fd, length - len(data), offset + len(data))
        if not more:
            raise FormatError(
                f"{name}: file shrank while reading {length} bytes at offset {offset}"
            )
        data += more
    return data


def pwrite_all(fd: int, data: bytes | bytearray | memoryview, offset: int) -> None:
    """Write all of `data` at `offset`, continuing after short writes."""
    view = memoryview(data)
    while len(view):
        n = os.pwrite(fd, view, offset)
        if n <= 0:
            raise OSError(f"pwrite wrote nothing at offset {offset}")
        view = view[n:]
        offset += n


@functools.cache
def _libc():
    """The C library, loaded once (find_library runs a subprocess)."""
    import ctypes
    import ctypes.util

    return ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


def punch_hole(fd: int, offset: int, length: int) -> None:
    """Deallocate a range so it reads as zeros (FALLOC_FL_PUNCH_HOLE | KEEP_SIZE)."""
    import ctypes

    falloc_fl_keep_size, falloc_fl_punch_hole = 0x01, 0x02
    rc = _libc().fallocate(
        fd,
        falloc_fl_keep_size | falloc_fl_punch_hole,
        ctypes.c_longlong(offset),
        ctypes.c_longlong(length),
    )
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


@contextlib.contextmanager
def atomic_output(target: str | os.PathLike[str]) -> Iterator[BinaryIO]:
    """A new file that replaces `target` only once the block succeeds and it is synced.

    The file is opened `w+b` in `target`'s folder. On any exception it is removed
    and `target` (if it existed) is left untouched.
    """
    target = Path(target)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    try:
        with os.fdopen(fd, "w+b") as f:
            yield f
            f.flush()
            os.fchmod(f.fileno(), OUTPUT_MODE)
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
