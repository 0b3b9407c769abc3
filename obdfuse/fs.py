"""The FUSE filesystem: one attached image served as the regular file `image`.

`ImageFS` is a thin pyfuse3 `Operations`: it translates kernel requests into
calls on a `BlockDevice` (the merged layer `Stack`, or any other device) and
maps every exception to an errno in one place (`_errno_boundary`). It holds no
block-map logic and no durable state, and its inode numbers are fixed, so a
later process can take over the `/dev/fuse` connection without the kernel (or a
loop device on top) noticing.

Tree (inode numbers are part of the contract):

    /                1  directory, lists only `image`
    /image           2  the virtual disk: size = device size, st_blocks = mapped data
    /.obdfuse-stat   3  hidden (absent from readdir, found by lookup): a JSON
                        snapshot of the daemon (pid, image, counters), taken
                        when the file is opened. Extend it by appending
                        callables to `ImageFS.stat_providers`.
"""

from __future__ import annotations

import errno
import functools
import json
import logging
import os
import stat
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, ParamSpec, TypeVar

import pyfuse3
import trio

from obdfuse.device import SECTOR, BlockDevice
from obdfuse.errors import ObdfuseError

log = logging.getLogger("obdfuse.fs")

ROOT_INODE = pyfuse3.ROOT_INODE
IMAGE_INODE = 2
STAT_INODE = 3
IMAGE_NAME = b"image"
STAT_NAME = b".obdfuse-stat"

_P = ParamSpec("_P")
_T = TypeVar("_T")

_MAX_LOGGED_ERRORS = 1000


@dataclass
class IOCounters:
    """Request counters published through `.obdfuse-stat`."""

    reads: int = 0
    writes: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    flushes: int = 0
    errors: int = 0
    unaligned_writes: int = 0


# File handles of `image` carry everything a request needs (no table), so a
# process taking over the FUSE connection can serve handles opened before it.
_IMAGE_FH_RO = IMAGE_INODE
_IMAGE_FH_RW = IMAGE_INODE | 1 << 32
_FIRST_STAT_FH = 1 << 33  # stat snapshots live in a table; reopen after a takeover


@dataclass
class _ErrorLog:
    """Logs each distinct failure once (with details), counts the rest."""

    seen: set[str] = field(default_factory=set)

    def report(self, where: str, exc: BaseException, *, with_traceback: bool = False) -> None:
        key = f"{where}: {type(exc).__name__}: {exc}"
        if key in self.seen:
            return
        if len(self.seen) < _MAX_LOGGED_ERRORS:
            self.seen.add(key)
        log.error("%s", key, exc_info=exc if with_traceback else None)


def _errno_boundary(
    method: Callable[_P, Awaitable[_T]],
) -> Callable[_P, Awaitable[_T]]:
    """Turn any exception of a handler into a FUSEError (the only place errnos are chosen).

    ObdfuseError (corrupt data, unreachable registry...) → EIO, logged once;
    PermissionError → EROFS on a read-only device, else EACCES; other OSError →
    its errno; anything unexpected → EIO with a traceback in the log. Without
    this, an exception would escape into pyfuse3 and end the main loop.
    """

    @functools.wraps(method)
    async def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> _T:
        self: ImageFS = args[0]  # type: ignore[assignment]
        try:
            return await method(*args, **kwargs)
        except pyfuse3.FUSEError:
            raise
        except ObdfuseError as exc:
            code = errno.EIO
            self._errors.report(method.__name__, exc)
        except PermissionError as exc:
            code = errno.EROFS if self.device.read_only else errno.EACCES
            self._errors.report(method.__name__, exc)
        except OSError as exc:
            code = exc.errno or errno.EIO
            self._errors.report(method.__name__, exc)
        except Exception as exc:
            code = errno.EIO
            self._errors.report(method.__name__, exc, with_traceback=True)
        self.counters.errors += 1
        raise pyfuse3.FUSEError(code)

    return wrapper


class ImageFS(pyfuse3.Operations):
    """pyfuse3 operations exposing `device` as `<mountpoint>/image`."""

    def __init__(
        self,
        device: BlockDevice,
        *,
        image_name: str = "",
        attr_timeout: float | None = None,
    ) -> None:
        super().__init__()
        self.device = device
        self.image_name = image_name
        self.counters = IOCounters()
        #: Callables returning extra JSON-able fields for `.obdfuse-stat`.
        self.stat_providers: list[Callable[[], dict[str, Any]]] = []
        self.ready = trio.Event()  # set once the kernel's INIT request was answered
        self._errors = _ErrorLog()
        self._stat_snapshots: dict[int, bytes] = {}
        self._next_stat_fh = _FIRST_STAT_FH
        self._image_opens = 0
        # Unknown after a takeover: the first fsync always reaches the device.
        self._dirty = not device.read_only
        self._flush_lock = trio.Lock()
        self._started_ns = time.time_ns()
        self._mtime_ns = self._started_ns
        self._uid, self._gid = os.getuid(), os.getgid()
        # A read-only image never changes: let the kernel cache attributes for long.
        self._attr_timeout = attr_timeout if attr_timeout is not None else (
            3600.0 if device.read_only else 1.0
        )

    # -- lifecycle ---------------------------------------------------------

    def init(self) -> None:
        self.ready.set()

    @property
    def open_handles(self) -> int:
        """Number of open handles on `image` (a loop device holds one)."""
        return self._image_opens

    # -- metadata ----------------------------------------------------------

    def _attrs(self, inode: int) -> pyfuse3.EntryAttributes:
        attrs = pyfuse3.EntryAttributes()
        attrs.st_ino = inode
        attrs.st_uid, attrs.st_gid = self._uid, self._gid
        attrs.st_blksize = 4096
        attrs.st_atime_ns = attrs.st_ctime_ns = self._started_ns
        attrs.st_mtime_ns = self._started_ns
        attrs.attr_timeout = attrs.entry_timeout = self._attr_timeout
        if inode == ROOT_INODE:
            attrs.st_mode = stat.S_IFDIR | 0o755
            attrs.st_nlink = 2
        elif inode == IMAGE_INODE:
            attrs.st_mode = stat.S_IFREG | (0o444 if self.device.read_only else 0o644)
            attrs.st_nlink = 1
            attrs.st_size = self.device.size
            attrs.st_blocks = (self.device.allocated_bytes() + SECTOR - 1) // SECTOR
            attrs.st_mtime_ns = attrs.st_ctime_ns = self._mtime_ns
        elif inode == STAT_INODE:
            attrs.st_mode = stat.S_IFREG | 0o444
            attrs.st_nlink = 1
            attrs.st_size = 0  # content is generated at open; reads are direct
            attrs.attr_timeout = attrs.entry_timeout = 0
        else:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return attrs

    @_errno_boundary
    async def lookup(
        self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        if parent_inode == ROOT_INODE:
            if name == IMAGE_NAME:
                return self._attrs(IMAGE_INODE)
            if name == STAT_NAME:
                return self._attrs(STAT_INODE)
        raise pyfuse3.FUSEError(errno.ENOENT)

    @_errno_boundary
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self._attrs(inode)

    @_errno_boundary
    async def setattr(
        self,
        inode: int,
        attr: pyfuse3.EntryAttributes,
        fields: pyfuse3.SetattrFields,
        fh: int | None,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        if fields.update_size and (inode != IMAGE_INODE or attr.st_size != self.device.size):
            raise pyfuse3.FUSEError(errno.EROFS if self.device.read_only else errno.EPERM)
        if fields.update_mode or fields.update_uid or fields.update_gid:
            raise pyfuse3.FUSEError(errno.EPERM)
        return self._attrs(inode)  # timestamps are not stored; `touch` is harmless

    @_errno_boundary
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        data = pyfuse3.StatvfsData()
        data.f_bsize = data.f_frsize = 4096
        data.f_blocks = self.device.size // 4096
        free = max(0, self.device.size - self.device.allocated_bytes()) // 4096
        data.f_bfree = data.f_bavail = 0 if self.device.read_only else free
        data.f_files, data.f_ffree, data.f_favail = 3, 0, 0
        data.f_namemax = 255
        return data

    # -- directory ---------------------------------------------------------

    @_errno_boundary
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        if inode != ROOT_INODE:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return inode

    @_errno_boundary
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        if start_id < 1:
            pyfuse3.readdir_reply(token, IMAGE_NAME, self._attrs(IMAGE_INODE), 1)

    async def releasedir(self, fh: int) -> None:
        return None

    # -- xattrs: none (answer quickly instead of ENOSYS round trips) --------

    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        raise pyfuse3.FUSEError(pyfuse3.ENOATTR)

    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        return []

    # -- the tree is fixed: refuse changes clearly instead of ENOSYS -------

    async def _fixed_tree(self, *args: object) -> None:
        raise pyfuse3.FUSEError(errno.EPERM)

    create = mknod = mkdir = symlink = link = unlink = rmdir = rename = _fixed_tree  # type: ignore[assignment]

    async def setxattr(self, inode: int, name: bytes, value: bytes, ctx: object) -> None:
        raise pyfuse3.FUSEError(errno.ENOTSUP)

    async def removexattr(self, inode: int, name: bytes, ctx: object) -> None:
        raise pyfuse3.FUSEError(pyfuse3.ENOATTR)

    # -- files -------------------------------------------------------------

    @_errno_boundary
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        writable = (flags & os.O_ACCMODE) != os.O_RDONLY
        if inode == STAT_INODE:
            if writable:
                raise pyfuse3.FUSEError(errno.EACCES)
            fh = self._next_stat_fh
            self._next_stat_fh += 1
            self._stat_snapshots[fh] = self.stat_snapshot()
            return pyfuse3.FileInfo(fh=fh, direct_io=True)
        if inode != IMAGE_INODE:
            raise pyfuse3.FUSEError(errno.EISDIR if inode == ROOT_INODE else errno.ENOENT)
        if writable and self.device.read_only:
            raise pyfuse3.FUSEError(errno.EROFS)
        self._image_opens += 1
        fh = _IMAGE_FH_RW if writable else _IMAGE_FH_RO
        # The kernel page cache stays valid across opens as long as nobody else
        # changes the data: true for read-only images. A writable device may
        # also be written by another front end (iSCSI), so don't keep it.
        return pyfuse3.FileInfo(fh=fh, keep_cache=self.device.read_only)

    @_errno_boundary
    async def read(self, fh: int, off: int, size: int) -> bytes:
        if fh not in (_IMAGE_FH_RO, _IMAGE_FH_RW):
            snapshot = self._stat_snapshots.get(fh)
            if snapshot is None:
                raise pyfuse3.FUSEError(errno.EBADF)
            return snapshot[off : off + size]
        if off >= self.device.size:
            return b""
        size = min(size, self.device.size - off)
        data = await self.device.pread(off, size)
        self.counters.reads += 1
        self.counters.bytes_read += len(data)
        return data

    @_errno_boundary
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        if fh != _IMAGE_FH_RW:
            raise pyfuse3.FUSEError(errno.EBADF)
        end = self.device.size
        if off >= end:
            raise pyfuse3.FUSEError(errno.ENOSPC)
        if off + len(buf) > end:
            buf = buf[: end - off]  # a short write; the kernel reports it
        # Partial sectors are the device's business: it serialises its read-modify-write
        # with every writer (FUSE and an iSCSI target may share it), which we cannot.
        await self.device.pwrite(off, buf)
        if off % SECTOR or len(buf) % SECTOR:
            self.counters.unaligned_writes += 1
        self._dirty = True
        self._mtime_ns = time.time_ns()
        self.counters.writes += 1
        self.counters.bytes_written += len(buf)
        return len(buf)

    @_errno_boundary
    async def flush(self, fh: int) -> None:
        if fh == _IMAGE_FH_RW:
            await self._flush_device()

    @_errno_boundary
    async def fsync(self, fh: int, datasync: bool) -> None:
        await self._flush_device()

    async def _flush_device(self) -> None:
        """Flush the device if anything was written since the last completed flush.

        Serialised: an fsync that finds a flush in flight waits for it instead of
        returning early on the already-cleared dirty flag (its data may not be durable
        until that flush completes).
        """
        if self.device.read_only:
            return
        async with self._flush_lock:
            if not self._dirty:
                return
            self._dirty = False
            try:
                await self.device.flush()
            except BaseException:
                self._dirty = True
                raise
            self.counters.flushes += 1

    async def release(self, fh: int) -> None:
        if fh in (_IMAGE_FH_RO, _IMAGE_FH_RW):
            self._image_opens = max(0, self._image_opens - 1)
        else:
            self._stat_snapshots.pop(fh, None)

    # -- control -----------------------------------------------------------

    def stat_snapshot(self) -> bytes:
        """The JSON document served as `.obdfuse-stat` (one object, newline-terminated)."""
        info: dict[str, Any] = {
            "pid": os.getpid(),
            "image": self.image_name,
            "size": self.device.size,
            "read_only": self.device.read_only,
            "allocated_bytes": self.device.allocated_bytes(),
            "started": self._started_ns / 1e9,
            "open_handles": self.open_handles,
            "counters": vars(self.counters).copy(),
        }
        for provider in self.stat_providers:
            info.update(provider())
        return (json.dumps(info, sort_keys=True) + "\n").encode()
