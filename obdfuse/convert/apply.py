"""Apply one OCI layer (a tar stream, plain / gzip / zstd) onto a directory tree.

This owns the OCI "changeset" semantics (image-spec layer.md): `.wh.NAME` deletes NAME
from the lower layers, `.wh..wh..opq` hides everything the lower layers put in its
directory, and entries of the same layer are never hidden by its own whiteouts. It
creates regular files (holes for all-zero chunks), directories, symlinks, hard links,
character/block devices and fifos, with numeric ownership, full modes (setuid, setgid,
sticky), xattrs (PAX `SCHILY.xattr.*` / `LIBARCHIVE.xattr.*`) and mtimes (directories
last, after their children).

Safety: the tree is only ever touched through directory file descriptors opened
component by component with `O_NOFOLLOW`, starting at the root. Entry names that are
absolute or contain `..` are rejected; a symlink met on the way to a parent directory
is followed the way the container will see it (an absolute target restarts at the
image root) and rejected if it climbs above the root. Nothing can therefore be
created, changed or removed outside the root. The stream is never loaded into memory;
extended headers are size-bounded before tarfile buffers them.

Must not: know about block devices, layers or registries.
"""

from __future__ import annotations

import base64
import collections
import contextlib
import errno
import gzip
import io
import os
import shutil
import stat
import tarfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import zstandard

from obdfuse.errors import FormatError, ObdfuseError
from obdfuse.fileio import pwrite_all

WHITEOUT_PREFIX = ".wh."
OPAQUE_MARKER = ".wh..wh..opq"
GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"

FILESYSTEM_OWNED = ("lost+found",)  # an opaque root keeps it (a layer never made it)
MAX_EXTENDED_HEADER = 16 << 20  # PAX / GNU long-name headers tarfile would buffer
MAX_SYMLINK_HOPS = 40
COPY_CHUNK = 1 << 20
SPARSE_BLOCK = 4096
_ZERO_CHUNK = bytes(COPY_CHUNK)
_ZERO_BLOCK = bytes(SPARSE_BLOCK)
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class ApplyError(ObdfuseError):
    """An entry of a layer could not be applied (names the layer and the entry)."""


class UnsafeEntryError(ApplyError, FormatError):
    """A hostile entry: it would reach outside the root of the tree being built."""


@dataclass
class ApplyStats:
    """What one layer changed."""

    entries: int = 0
    files: int = 0
    bytes_written: int = 0
    whiteouts: int = 0
    opaque_dirs: int = 0
    warnings: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------- streams


def detect_compression(head: bytes) -> str:
    """`gzip`, `zstd` or `tar` from the first bytes of a layer blob."""
    if head.startswith(GZIP_MAGIC):
        return "gzip"
    if head.startswith(ZSTD_MAGIC):
        return "zstd"
    return "tar"


def open_tar_stream(raw: BinaryIO) -> BinaryIO:
    """A readable stream of the uncompressed tar, whatever compression `raw` uses.

    Detection is by magic, not by media type (registries and tools mislabel layers).
    `raw` is read sequentially and never closed.
    """
    head = _read_exactly(raw, 4)
    peeked = _PrefixedStream(head, raw)
    kind = detect_compression(head)
    if kind == "gzip":
        return gzip.GzipFile(fileobj=peeked, mode="rb")  # type: ignore[return-value]
    if kind == "zstd":
        return zstandard.ZstdDecompressor().stream_reader(  # type: ignore[return-value]
            peeked, read_size=1 << 20, read_across_frames=True, closefd=False
        )
    return peeked  # type: ignore[return-value]


def _read_exactly(raw: BinaryIO, n: int) -> bytes:
    data = b""
    while len(data) < n:
        more = raw.read(n - len(data))
        if not more:
            break
        data += more
    return data


class _PrefixedStream(io.RawIOBase):
    """`head` followed by the rest of `raw` (peeking without a closing wrapper)."""

    def __init__(self, head: bytes, raw: BinaryIO) -> None:
        self._head = head
        self._raw = raw

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:  # type: ignore[override]
        if self._head:
            n = min(len(buf), len(self._head))
            buf[:n] = self._head[:n]
            self._head = self._head[n:]
            return n
        data = self._raw.read(len(buf))
        buf[: len(data)] = data
        return len(data)

    def read(self, n: int = -1) -> bytes:
        if self._head:
            if n is None or n < 0:
                out, self._head = self._head + self._raw.read(), b""
                return out
            out, self._head = self._head[:n], self._head[n:]
            return out
        return self._raw.read(n)

    def close(self) -> None:  # the caller owns raw
        self._head = b""
        super().close()


class _BlockPaddedStream(io.RawIOBase):
    """The tar stream, zero-padded at EOF to a whole 512-byte block.

    Some writers (umoci insert, for one) end a layer right after the last member's
    data, without padding or end-of-archive blocks; Go's reader accepts that, so do
    we. The padding can never stand in for missing file data: `real_bytes` lets the
    applier check that each file's data really was in the stream.
    """

    def __init__(self, inner: BinaryIO) -> None:
        self._inner = inner
        self.real_bytes = 0
        self._pad: int | None = None

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:  # type: ignore[override]
        data = self.read(len(buf))
        buf[: len(data)] = data
        return len(data)

    def read(self, n: int = -1) -> bytes:
        if self._pad is None:
            data = self._inner.read(n if n is not None and n >= 0 else 1 << 20)
            if data or n == 0:
                self.real_bytes += len(data)
                return data
            self._pad = -self.real_bytes % 512
        k = self._pad if n is None or n < 0 else min(n, self._pad)
        self._pad -= k
        return bytes(k)


def drain(stream: BinaryIO) -> None:
    """Read a stream to its end (so digest checks below it run)."""
    while stream.read(1 << 20):
        pass


class _BoundedTarInfo(tarfile.TarInfo):
    """TarInfo that refuses absurd extended headers before tarfile reads them into memory."""

    def _proc_member(self, tarfile_):  # type: ignore[override]
        if (
            self.type
            in (
                tarfile.GNUTYPE_LONGNAME,
                tarfile.GNUTYPE_LONGLINK,
                tarfile.XHDTYPE,
                tarfile.XGLTYPE,
                tarfile.SOLARIS_XHDTYPE,
            )
            and not 0 <= self.size <= MAX_EXTENDED_HEADER
        ):
            raise FormatError(
                f"extended tar header of {self.size} bytes (limit {MAX_EXTENDED_HEADER}) "
                f"before {self.name!r}"
            )
        return super()._proc_member(tarfile_)


def iter_tar(stream: BinaryIO) -> Iterator[tuple[tarfile.TarInfo, tarfile.TarFile]]:
    """Members of an uncompressed tar stream, read strictly sequentially."""
    try:
        tf = tarfile.open(  # noqa: SIM115 - closed by the with below
            fileobj=stream,
            mode="r|",
            tarinfo=_BoundedTarInfo,
            encoding="utf-8",
            errors="surrogateescape",
        )
    except (tarfile.ReadError, OSError, EOFError, zstandard.ZstdError) as exc:
        raise FormatError(f"not a tar stream: {exc}") from exc
    with tf:
        while True:
            try:
                member = tf.next()
            except (tarfile.TarError, OSError, EOFError, zstandard.ZstdError) as exc:
                raise FormatError(f"bad tar stream after {tf.offset} bytes: {exc}") from exc
            if member is None:
                return
            yield member, tf


# ----------------------------------------------------------------------------- paths


def split_entry_name(name: str, *, what: str = "entry") -> list[str]:
    """Path components of a tar entry name, relative to the root.

    Leading `./` and empty or `.` components are dropped; absolute names and `..`
    components are hostile and rejected.
    """
    subject = "the name" if what == "entry" else f"{what} {name!r}"
    if name.startswith("/"):
        raise UnsafeEntryError(f"{subject} is an absolute path")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise UnsafeEntryError(f"{subject} contains '..'")
    if any("\0" in p for p in parts):
        raise UnsafeEntryError(f"{subject} contains a NUL byte")
    return parts


class RootedTree:
    """A directory tree reached only through fds below `root` (openat walking)."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root_path = os.fspath(root)
        self.root_fd = os.open(self.root_path, _DIR_FLAGS)
        self._cache: collections.OrderedDict[tuple[str, ...], int] = collections.OrderedDict()

    def close(self) -> None:
        self.forget()
        if self.root_fd >= 0:
            os.close(self.root_fd)
            self.root_fd = -1

    def forget(self) -> None:
        """Drop cached directory fds (after anything was removed or replaced)."""
        while self._cache:
            _, fd = self._cache.popitem()
            os.close(fd)

    def open_dir(self, parts: list[str], *, create: bool) -> int:
        """A new fd of the directory `parts` (caller closes it).

        Missing directories are created (0755, root-owned) if `create`. Symlinks are
        followed inside the root; absolute targets restart at the root; climbing
        above the root raises UnsafeEntryError.
        """
        key = tuple(parts)
        cached = self._cache.get(key)
        if cached is not None:
            self._cache.move_to_end(key)
            return os.dup(cached)
        fd = self._walk(parts, create=create)
        self._cache[key] = os.dup(fd)
        if len(self._cache) > 16:
            _, old = self._cache.popitem(last=False)
            os.close(old)
        return fd

    def _walk(self, parts: list[str], *, create: bool) -> int:
        stack = [os.dup(self.root_fd)]
        todo = collections.deque(parts)
        hops = 0
        try:
            while todo:
                comp = todo.popleft()
                if comp in ("", "."):
                    continue
                if comp == "..":
                    if len(stack) == 1:
                        raise UnsafeEntryError(
                            f"path {'/'.join(parts)!r} leads through a symlink above the root"
                        )
                    os.close(stack.pop())
                    continue
                here = stack[-1]
                try:
                    st = os.lstat(comp, dir_fd=here)
                except FileNotFoundError:
                    if not create:
                        raise
                    os.mkdir(comp, 0o755, dir_fd=here)
                    st = os.lstat(comp, dir_fd=here)
                if stat.S_ISLNK(st.st_mode):
                    hops += 1
                    if hops > MAX_SYMLINK_HOPS:
                        raise OSError(errno.ELOOP, "too many symlinks", "/".join(parts))
                    target = os.readlink(comp, dir_fd=here)
                    if target.startswith("/"):
                        for fd in stack[1:]:
                            os.close(fd)
                        del stack[1:]
                    todo.extendleft(reversed(target.split("/")))
                    continue
                if not stat.S_ISDIR(st.st_mode):
                    raise OSError(errno.ENOTDIR, "not a directory", "/".join(parts))
                stack.append(os.open(comp, _DIR_FLAGS, dir_fd=here))
            result = stack.pop()
            return result
        finally:
            for fd in stack:
                os.close(fd)


# ----------------------------------------------------------------------------- applier


def apply_layer(
    raw: BinaryIO,
    root: str | os.PathLike[str],
    *,
    layer_name: str = "layer",
    on_entry: Callable[[tarfile.TarInfo], None] | None = None,
) -> ApplyStats:
    """Apply the layer blob `raw` (tar, tar+gzip or tar+zstd) onto the tree at `root`.

    Reads `raw` once, sequentially, to its very end (so a verifying stream below
    checks its digest), but never closes it.
    """
    try:
        return _apply_stream(raw, root, layer_name, on_entry)
    except FormatError:
        # A damaged blob usually shows up as a tar/decompression error first; if the
        # blob also fails its digest, that is the error worth reporting.
        drain(raw)
        raise


def _apply_stream(
    raw: BinaryIO,
    root: str | os.PathLike[str],
    layer_name: str,
    on_entry: Callable[[tarfile.TarInfo], None] | None,
) -> ApplyStats:
    try:
        stream = open_tar_stream(raw)
    except OSError as exc:
        raise FormatError(f"{layer_name}: cannot decompress: {exc}") from exc
    padded = _BlockPaddedStream(stream)
    with contextlib.closing(LayerApplier(root, layer_name=layer_name)) as applier:
        applier.source = padded
        try:
            for member, tf in iter_tar(padded):  # type: ignore[arg-type]
                applier.apply_member(member, tf)
                if on_entry is not None:
                    on_entry(member)
        except (EOFError, zstandard.ZstdError) as exc:
            raise FormatError(f"{layer_name}: cannot decompress: {exc}") from exc
        applier.finish()
        try:
            drain(stream)  # padding after the end-of-archive blocks
        except (OSError, EOFError, zstandard.ZstdError) as exc:
            raise FormatError(f"{layer_name}: bad data after the end of the tar: {exc}") from exc
        drain(raw)
        return applier.stats


class LayerApplier:
    """Applies the members of one layer, in archive order, onto a tree."""

    def __init__(self, root: str | os.PathLike[str], *, layer_name: str = "layer") -> None:
        self.tree = RootedTree(root)
        self.layer_name = layer_name
        self.stats = ApplyStats()
        self.source: _BlockPaddedStream | None = None  # to check file data was really there
        self._touched: set[tuple[str, ...]] = set()
        self._dir_times: list[tuple[tuple[str, ...], int]] = []
        # times of existing directories before this layer changed their contents
        self._dir_before: dict[tuple[str, ...], tuple[int, int]] = {}
        try:
            vfs = os.statvfs(self.tree.root_fd)
            self._fs_bytes = vfs.f_blocks * vfs.f_frsize
        except OSError:
            self._fs_bytes = 1 << 62

    def close(self) -> None:
        self.tree.close()

    # -- entry dispatch

    def apply_member(self, member: tarfile.TarInfo, tf: tarfile.TarFile) -> None:
        """Apply one tar member; errors name the layer and the entry."""
        try:
            self._apply(member, tf)
        except UnsafeEntryError as exc:
            raise UnsafeEntryError(f"{self.layer_name}: entry {member.name!r}: {exc}") from None
        except FormatError as exc:
            raise FormatError(f"{self.layer_name}: entry {member.name!r}: {exc}") from exc
        except ApplyError as exc:
            raise ApplyError(f"{self.layer_name}: entry {member.name!r}: {exc}") from None
        except (zlib.error, zstandard.ZstdError, EOFError, gzip.BadGzipFile) as exc:
            raise FormatError(
                f"{self.layer_name}: entry {member.name!r}: corrupt compressed data: {exc}"
            ) from exc
        except OSError as exc:
            what = exc.strerror or str(exc)
            raise ApplyError(
                f"{self.layer_name}: entry {member.name!r}: {what}"
                + (f" ({exc.filename})" if exc.filename else "")
            ) from exc
        self.stats.entries += 1

    def _apply(self, member: tarfile.TarInfo, tf: tarfile.TarFile) -> None:
        parts = split_entry_name(member.name)
        if not parts:  # the root itself ("./")
            if member.isdir():
                self._set_metadata(self.tree.root_fd, None, member, is_dir=True, key=())
            return
        *parent, leaf = parts
        if leaf == OPAQUE_MARKER:
            self._opaque(parent)
            return
        if leaf.startswith(WHITEOUT_PREFIX):
            if leaf.startswith(WHITEOUT_PREFIX + WHITEOUT_PREFIX):
                return  # other aufs metadata (.wh..wh.plnk etc.) is not content
            self._whiteout(parent, leaf[len(WHITEOUT_PREFIX) :])
            return
        if member.isreg() and member.size > self._fs_bytes:
            raise FormatError(
                f"claims {member.size} bytes, more than the whole filesystem "
                f"({self._fs_bytes} bytes)"
            )
        self._note_dirs(parent)
        dfd = self.tree.open_dir(parent, create=True)
        try:
            for i in range(1, len(parts) + 1):
                self._touched.add(tuple(parts[:i]))  # implicit parents belong to this layer too
            if member.isdir():
                self._make_dir(dfd, leaf, member, tuple(parts))
            elif member.islnk():
                self._make_hardlink(dfd, leaf, member)
            else:
                self._clear_for(dfd, leaf, keep_dir=False)
                if member.issym():
                    os.symlink(member.linkname, leaf, dir_fd=dfd)
                elif member.ischr() or member.isblk():
                    kind = stat.S_IFCHR if member.ischr() else stat.S_IFBLK
                    dev = os.makedev(member.devmajor, member.devminor)
                    os.mknod(leaf, kind | 0o600, dev, dir_fd=dfd)
                elif member.isfifo():
                    os.mkfifo(leaf, 0o600, dir_fd=dfd)
                else:
                    self._write_file(dfd, leaf, member, tf)
                self._set_metadata(dfd, leaf, member, is_dir=False, key=tuple(parts))
        finally:
            os.close(dfd)

    # -- whiteouts

    def _whiteout(self, parent: list[str], name: str) -> None:
        if name in ("", ".", "..") or "/" in name:
            raise UnsafeEntryError(f"whiteout of {name!r} names no entry")
        self.stats.whiteouts += 1
        if (*parent, name) in self._touched:
            return  # whiteouts hide lower layers only, never this layer's own entries
        self._note_dirs(parent)
        try:
            dfd = self.tree.open_dir(parent, create=False)
        except (FileNotFoundError, NotADirectoryError):
            return
        except OSError as exc:
            if exc.errno == errno.ENOTDIR:
                return
            raise
        try:
            self._remove(dfd, name)
        finally:
            os.close(dfd)

    def _opaque(self, parent: list[str]) -> None:
        self.stats.opaque_dirs += 1
        self._note_dirs(parent)
        dfd = self.tree.open_dir(parent, create=True)
        try:
            self._clear_lower_children(dfd, tuple(parent))
        finally:
            os.close(dfd)

    def _clear_lower_children(self, dfd: int, prefix: tuple[str, ...]) -> None:
        """Remove what lower layers put in this dir; keep (and descend into) this layer's."""
        if prefix not in self._dir_before:
            st = os.fstat(dfd)
            self._dir_before[prefix] = (st.st_atime_ns, st.st_mtime_ns)
        for name in os.listdir(dfd):
            key = (*prefix, name)
            if key == FILESYSTEM_OWNED:
                continue  # belongs to the filesystem, not to any layer
            if key not in self._touched:
                self._remove(dfd, name)
                continue
            st = os.lstat(name, dir_fd=dfd)
            if stat.S_ISDIR(st.st_mode):
                sub = os.open(name, _DIR_FLAGS, dir_fd=dfd)
                try:
                    self._clear_lower_children(sub, key)
                finally:
                    os.close(sub)

    def _remove(self, dfd: int, name: str) -> None:
        """Remove `name` in dfd, whatever it is; never follows symlinks."""
        try:
            st = os.lstat(name, dir_fd=dfd)
        except FileNotFoundError:
            return
        self.tree.forget()
        if stat.S_ISDIR(st.st_mode):
            shutil.rmtree(name, dir_fd=dfd)
        else:
            os.unlink(name, dir_fd=dfd)

    def _clear_for(self, dfd: int, name: str, *, keep_dir: bool) -> os.stat_result | None:
        """Make room for a new entry; an existing directory survives if keep_dir."""
        try:
            st = os.lstat(name, dir_fd=dfd)
        except FileNotFoundError:
            return None
        if keep_dir and stat.S_ISDIR(st.st_mode):
            return st
        self._remove(dfd, name)
        return None

    # -- entry kinds

    def _make_dir(self, dfd: int, leaf: str, member: tarfile.TarInfo, key: tuple[str, ...]) -> None:
        if self._clear_for(dfd, leaf, keep_dir=True) is None:
            os.mkdir(leaf, 0o700, dir_fd=dfd)
        self._set_metadata(dfd, leaf, member, is_dir=True, key=key)

    def _make_hardlink(self, dfd: int, leaf: str, member: tarfile.TarInfo) -> None:
        target = split_entry_name(member.linkname, what="hard link target")
        if not target:
            raise UnsafeEntryError("hard link to the root directory")
        *tparent, tleaf = target
        try:
            tfd = self.tree.open_dir(tparent, create=False)
        except FileNotFoundError:
            raise ApplyError(f"hard link target {member.linkname!r} does not exist") from None
        try:
            try:
                tst = os.lstat(tleaf, dir_fd=tfd)
            except FileNotFoundError:
                raise ApplyError(f"hard link target {member.linkname!r} does not exist") from None
            if stat.S_ISDIR(tst.st_mode):
                raise ApplyError(f"hard link target {member.linkname!r} is a directory")
            try:
                if os.lstat(leaf, dir_fd=dfd).st_ino == tst.st_ino:
                    return  # already the same inode
            except FileNotFoundError:
                pass
            self._clear_for(dfd, leaf, keep_dir=False)
            os.link(tleaf, leaf, src_dir_fd=tfd, dst_dir_fd=dfd, follow_symlinks=False)
        finally:
            os.close(tfd)

    def _write_file(
        self, dfd: int, leaf: str, member: tarfile.TarInfo, tf: tarfile.TarFile
    ) -> None:
        fd = os.open(
            leaf,
            os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
            0o600,
            dir_fd=dfd,
        )
        try:
            src = tf.extractfile(member)
            if src is None:
                raise FormatError("regular file without data")
            pos = 0
            while True:
                chunk = src.read(COPY_CHUNK)
                if not chunk:
                    break
                write_sparse(fd, pos, chunk)
                pos += len(chunk)
            if pos != member.size:
                raise FormatError(f"data ends after {pos} of {member.size} bytes")
            if self.source is not None and not member.sparse:
                missing = member.offset_data + member.size - self.source.real_bytes
                if missing > 0:
                    raise FormatError(f"the stream ends {missing} bytes before this file's end")
            os.ftruncate(fd, pos)
            self.stats.files += 1
            self.stats.bytes_written += pos
        except tarfile.TarError as exc:
            raise FormatError(f"bad file data: {exc}") from exc
        finally:
            os.close(fd)

    # -- metadata

    def _set_metadata(
        self,
        dfd: int,
        leaf: str | None,
        member: tarfile.TarInfo,
        *,
        is_dir: bool,
        key: tuple[str, ...],
    ) -> None:
        """Owner, mode, xattrs, then mtime (deferred for directories)."""
        # leaf None means "dfd itself" (the root); paths via /proc keep fd-relative access
        path = leaf if leaf is not None else "."
        os.chown(path, member.uid, member.gid, dir_fd=dfd, follow_symlinks=False)
        if not member.issym():
            # chmod after chown: chown clears setuid/setgid
            os.chmod(path, member.mode & 0o7777, dir_fd=dfd)
        for xname, value in _xattrs(member):
            proc = f"/proc/self/fd/{dfd}/{path}"
            try:
                os.setxattr(proc, xname, value, follow_symlinks=False)
            except OSError as exc:
                if exc.errno in (errno.ENOTSUP, errno.EPERM) and member.issym():
                    self.stats.warnings.append(
                        f"{member.name}: xattr {xname} not allowed on symlink"
                    )
                    continue
                raise OSError(exc.errno, f"setting xattr {xname}: {exc.strerror}") from exc
        ns = mtime_ns(member)
        if is_dir:
            self._dir_times.append((key, ns))
        else:
            os.utime(path, ns=(ns, ns), dir_fd=dfd, follow_symlinks=False)

    def _note_dirs(self, parent: list[str]) -> None:
        """Remember the times of `parent` and its ancestors before this layer touches them.

        A directory whose contents a layer changes without listing the directory
        itself (e.g. a bare whiteout) keeps its old mtime, as `umoci unpack` does —
        the result never depends on when the conversion ran.
        """
        for i in range(len(parent) + 1):
            key = tuple(parent[:i])
            if key in self._dir_before:
                continue
            try:
                fd = self.tree.open_dir(list(key), create=False)
            except OSError:  # missing (made by this layer) or not a directory
                return
            try:
                st = os.fstat(fd)
                self._dir_before[key] = (st.st_atime_ns, st.st_mtime_ns)
            finally:
                os.close(fd)

    def finish(self) -> None:
        """Set directory times now that their children exist: listed directories get
        their own mtime, other directories this layer changed get their old one back."""
        self.tree.forget()
        listed = {key for key, _ in self._dir_times}
        for key, (atime, mtime) in self._dir_before.items():
            if key in listed:
                continue
            try:
                fd = self.tree.open_dir(list(key), create=False)
            except OSError:
                continue  # removed by this layer
            try:
                os.utime(fd, ns=(atime, mtime))
            finally:
                os.close(fd)
        self._dir_before.clear()
        for key, ns in sorted(self._dir_times, key=lambda kv: -len(kv[0])):
            try:
                fd = self.tree.open_dir(list(key), create=False)
            except FileNotFoundError:
                continue  # removed later in the same layer
            try:
                os.utime(fd, ns=(ns, ns))
            finally:
                os.close(fd)
        self._dir_times.clear()


def write_sparse(fd: int, offset: int, data: bytes) -> None:
    """pwrite `data` at `offset`, leaving holes where whole 4 KiB blocks are zero.

    Holes read back as zeros, so the image keeps neither the zeros nor their blocks.
    (The caller truncates the file to its full size at the end.)
    """
    n = len(data)
    if data.find(_ZERO_BLOCK) < 0:  # the common case: no zero block at all
        pwrite_all(fd, memoryview(data), offset)
        return
    if n == COPY_CHUNK and data == _ZERO_CHUNK:
        return
    view = memoryview(data)
    start = None  # start of the current run of data blocks
    for pos in range(0, n, SPARSE_BLOCK):
        zero = view[pos : pos + SPARSE_BLOCK] == _ZERO_BLOCK[: min(SPARSE_BLOCK, n - pos)]
        if zero and start is not None:
            pwrite_all(fd, view[start:pos], offset + start)
            start = None
        elif not zero and start is None:
            start = pos
    if start is not None:
        pwrite_all(fd, view[start:], offset + start)


def mtime_ns(member: tarfile.TarInfo) -> int:
    """The entry's mtime in ns, exact for PAX decimal mtimes (floats would round)."""
    text = member.pax_headers.get("mtime")
    if text:
        whole, _, frac = text.strip().partition(".")
        try:
            sign = -1 if whole.startswith("-") else 1
            seconds = int(whole)
            nanos = int((frac + "000000000")[:9]) if frac else 0
            return seconds * 1_000_000_000 + sign * nanos
        except ValueError:
            raise FormatError(f"bad PAX mtime {text!r}") from None
    return int(member.mtime) * 1_000_000_000


def _xattrs(member: tarfile.TarInfo) -> Iterator[tuple[str, bytes]]:
    """Extended attributes carried in the member's PAX records."""
    for key, value in member.pax_headers.items():
        if key.startswith("SCHILY.xattr."):
            yield key[len("SCHILY.xattr.") :], value.encode("utf-8", "surrogateescape")
        elif key.startswith("LIBARCHIVE.xattr."):
            name = key[len("LIBARCHIVE.xattr.") :]
            try:
                yield name, base64.b64decode(value + "=" * (-len(value) % 4))
            except ValueError:
                raise FormatError(f"bad base64 in xattr {name!r}") from None


def apply_layer_file(path: str | os.PathLike[str], root: str | os.PathLike[str]) -> ApplyStats:
    """Apply a layer blob stored in a local file (convenience for tools and tests)."""
    with open(path, "rb") as raw:
        return apply_layer(raw, root, layer_name=Path(path).name)
