"""Serialise a directory tree as a PAX tar stream (for `obdfuse build`).

Everything the applier restores is recorded: numeric owners, full modes, mtimes,
symlink targets, hard links (by inode), devices, fifos and xattrs (as
`SCHILY.xattr.*`). Sockets cannot be archived and are skipped with a warning.
`build` then goes through the same safe applier as `convert`.
"""

from __future__ import annotations

import logging
import os
import tarfile
import threading
from pathlib import Path
from typing import BinaryIO

log = logging.getLogger(__name__)


def write_tree_tar(root: Path, out: BinaryIO, *, exclude: tuple[Path, ...] = ()) -> int:
    """Write `root` as a PAX tar to `out` (not closed); returns the number of entries.

    Directories in `exclude` (e.g. the build's own work area) are left out.
    """
    count = 0
    skip = {os.path.realpath(p) for p in exclude}
    with tarfile.open(
        fileobj=out,
        mode="w|",
        format=tarfile.PAX_FORMAT,
        encoding="utf-8",
        errors="surrogateescape",
        bufsize=1 << 20,
    ) as tf:
        for path, arcname in _walk(root, skip):
            try:
                ti = tf.gettarinfo(str(path), arcname)
            except OSError as exc:
                raise OSError(exc.errno, f"cannot read {path}: {exc.strerror}") from exc
            if ti is None:
                log.warning("%s: sockets cannot be stored in an image; skipped", path)
                continue
            ti.uname = ti.gname = ""  # numeric ownership only
            pax = {
                f"SCHILY.xattr.{k}": v.decode("utf-8", "surrogateescape")
                for k, v in _xattrs(path).items()
            }
            ns = os.lstat(path).st_mtime_ns
            if ns % 1_000_000_000:  # exact sub-second mtime (a float would round)
                pax["mtime"] = f"{ns // 1_000_000_000}.{ns % 1_000_000_000:09d}"
            ti.mtime = ns // 1_000_000_000
            ti.pax_headers = pax
            if ti.isreg():
                with open(path, "rb") as f:
                    tf.addfile(ti, f)
            else:
                tf.addfile(ti)
            count += 1
    return count


def _walk(root: Path, skip: set[str]):
    """(path, archive name) of the root and everything below it, parents first."""
    yield root, "."
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(
            d for d in dirnames if os.path.realpath(os.path.join(dirpath, d)) not in skip
        )
        for name in sorted(dirnames + filenames):
            path = Path(dirpath, name)
            yield path, "./" + str(path.relative_to(root))


def _xattrs(path: Path) -> dict[str, bytes]:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError:
        return {}
    out = {}
    for name in names:
        try:
            out[name] = os.getxattr(path, name, follow_symlinks=False)
        except OSError:
            continue
    return out


class TreeTarStream:
    """A readable pipe carrying `write_tree_tar(root)` produced by a thread.

    Use as a context manager; errors of the producer are re-raised on close.
    """

    def __init__(self, root: Path, *, exclude: tuple[Path, ...] = ()) -> None:
        if not root.is_dir():
            raise NotADirectoryError(20, "not a directory", str(root))
        rfd, wfd = os.pipe()
        self.reader: BinaryIO = os.fdopen(rfd, "rb", buffering=1 << 20)
        self._writer = os.fdopen(wfd, "wb", buffering=1 << 20)
        self._error: BaseException | None = None
        self._exclude = exclude
        self._thread = threading.Thread(target=self._produce, args=(root,), daemon=True)
        self._thread.start()

    def _produce(self, root: Path) -> None:
        try:
            write_tree_tar(root, self._writer, exclude=self._exclude)
        except BaseException as exc:  # handed to the consumer
            self._error = exc
        finally:
            try:
                self._writer.close()
            except OSError as exc:  # reader went away early
                if self._error is None and not isinstance(exc, BrokenPipeError):
                    self._error = exc

    def __enter__(self) -> BinaryIO:
        return self.reader

    def __exit__(self, exc_type, exc, tb) -> None:
        self.reader.close()  # unblocks the producer if we stopped early
        self._thread.join()
        if exc_type is None and self._error is not None:
            raise self._error
