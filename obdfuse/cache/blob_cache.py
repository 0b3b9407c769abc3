"""`BlobCache` (one cache directory) and `CachedBlob` (a Blob served through it).

A CachedBlob wraps a remote Blob (normally a RegistryBlob). Reads are split
into aligned chunks; missing neighbouring chunks are fetched with one range
request, concurrent readers of a chunk share its fetch, sequential reads start
readahead in the background. Once every chunk of a blob is present its sha256
is checked against the digest; on mismatch the blob's cache is dropped and the
read fails (never wrong bytes). Small blobs are fetched whole and verified
before any byte is served. The cache directory is bounded by an LRU over
chunks of all blobs; chunks being read are pinned.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import trio

from obdfuse.blob import Blob, clamp
from obdfuse.cache.store import BlobBusy, BlobFiles
from obdfuse.errors import CorruptDataError, ObdfuseError

log = logging.getLogger(__name__)

DEFAULT_CACHE_DIR = Path("/var/cache/obdfuse")
DEFAULT_CHUNK = 1 << 20
MAX_REQUEST_CHUNKS = 32
READAHEAD_START = 1  # chunks, once a sequential streak has covered one chunk
READAHEAD_MAX = 16

ChunkKey = tuple[str, int]


@dataclass
class CacheStats:
    """What one CachedBlob did: served, hit, fetched."""

    reads: int = 0
    bytes_read: int = 0
    cache_hits: int = 0  # reads served without any fetch
    cache_misses: int = 0
    chunks_fetched: int = 0
    readahead_chunks: int = 0
    background_bytes: int = 0
    prefetch_chunks: int = 0  # chunks a prefetch (trace replay) found missing
    verify_failures: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


@dataclass
class _Fetch:
    """One in-flight range request covering chunks [first, last]."""

    first: int
    last: int
    done: trio.Event = field(default_factory=trio.Event)
    error: BaseException | None = None


class BlobCache:
    """One process's view of a cache directory.

    Several processes may share a directory: each blob's files belong to the
    process holding its lock (see BlobFiles); a blob owned elsewhere is cached
    in a private, non-persistent directory instead. The size cap counts the
    blobs this process owns.
    """

    def __init__(self, root: Path = DEFAULT_CACHE_DIR, *, chunk_size: int = DEFAULT_CHUNK,
                 capacity: int | None = None, whole_below: int = 4 << 20) -> None:
        if chunk_size <= 0 or chunk_size % 4096:
            raise ObdfuseError(f"cache chunk size must be a positive multiple of 4096, "
                               f"not {chunk_size}")
        self.root = Path(root)
        self.blob_dir = self.root / "blobs"
        self.chunk_size = chunk_size
        self.capacity = capacity
        self.whole_below = whole_below
        self.blob_dir.mkdir(parents=True, exist_ok=True)
        self.private_dir = self.root / "private" / str(os.getpid())
        self._files: dict[str, BlobFiles] = {}
        self._lru: OrderedDict[ChunkKey, int] = OrderedDict()
        self.used = 0
        self._pins: dict[ChunkKey, int] = {}
        self.blobs: list[CachedBlob] = []
        self.demand_active = 0
        self._scan()

    # ---------------------------------------------------------------- disk state

    def _scan(self) -> None:
        _remove_stale_private_dirs(self.root / "private")
        maps = sorted(self.blob_dir.glob("*.map"), key=_mtime)
        for map_path in maps:
            header = BlobFiles.read_header(map_path)
            digest = "sha256:" + map_path.stem
            if header is None or header[0] > MAX_SCAN_BLOB or header[1] < 4096:
                continue  # not ours to interpret
            try:
                files = BlobFiles(self.blob_dir, digest, header[0], header[1])
            except (BlobBusy, FileNotFoundError):
                continue  # owned by another process right now
            if header[1] != self.chunk_size:  # written with another chunk size: drop it
                files.remove()
                continue
            self._adopt(files)
        for tmp in self.blob_dir.glob("*.tmp"):
            tmp.unlink(missing_ok=True)
        self.evict_to_fit()

    def _adopt(self, files: BlobFiles) -> None:
        self._files[files.digest] = files
        for i in files.present_indices():
            n = files.chunk_bytes(i)
            self._lru[(files.digest, i)] = n
            self.used += n

    def files_for(self, digest: str, size: int) -> BlobFiles:
        files = self._files.get(digest)
        if files is not None and files.size == size:
            return files
        if files is not None:  # same digest, other size: stale, start over
            self._forget(files)
            files.remove()
        try:
            files = BlobFiles(self.blob_dir, digest, size, self.chunk_size)
        except BlobBusy:
            log.warning("cache: %s is in use by another process; caching it privately", digest)
            self.private_dir.mkdir(parents=True, exist_ok=True)
            files = BlobFiles(self.private_dir, digest, size, self.chunk_size)
        self._adopt(files)
        return files

    def _forget(self, files: BlobFiles) -> None:
        for i in files.present_indices():
            n = self._lru.pop((files.digest, i), None)
            if n is not None:
                self.used -= n

    # ---------------------------------------------------------------- LRU

    def touch(self, digest: str, first: int, last: int) -> None:
        for i in range(first, last + 1):
            key = (digest, i)
            if key in self._lru:
                self._lru.move_to_end(key)

    def added(self, files: BlobFiles, first: int, last: int) -> None:
        for i in range(first, last + 1):
            key = (files.digest, i)
            if key not in self._lru:
                n = files.chunk_bytes(i)
                self._lru[key] = n
                self.used += n
        self.evict_to_fit()

    def pin(self, digest: str, first: int, last: int, delta: int) -> None:
        for i in range(first, last + 1):
            key = (digest, i)
            count = self._pins.get(key, 0) + delta
            if count:
                self._pins[key] = count
            else:
                self._pins.pop(key, None)

    def evict_to_fit(self) -> None:
        """Evict least recently used unpinned chunks until under capacity.

        Runs synchronously on the trio thread so that no reader can see a chunk
        between its eviction and the punch of its data.
        """
        if self.capacity is None or self.used <= self.capacity:
            return
        victims: dict[str, list[int]] = {}
        for key, n in list(self._lru.items()):
            if self.used <= self.capacity:
                break
            if key in self._pins:
                continue
            del self._lru[key]
            self.used -= n
            victims.setdefault(key[0], []).append(key[1])
        for digest, indices in victims.items():
            self._files[digest].evict(indices)
        if victims:
            log.debug("cache: evicted %d chunks, %d bytes in use",
                      sum(map(len, victims.values())), self.used)

    def drop_blob(self, files: BlobFiles) -> None:
        self._forget(files)
        files.drop_all()

    # ---------------------------------------------------------------- demand priority

    def demand_started(self) -> None:
        self.demand_active += 1

    def demand_finished(self) -> None:
        self.demand_active -= 1

    async def wait_demand_idle(self) -> None:
        """Return once no demand fetch is in flight (background work yields to demand)."""
        while self.demand_active:
            await trio.sleep(0.02)

    # ---------------------------------------------------------------- blobs

    def wrap(self, remote: Blob, digest: str, *, name: str | None = None) -> CachedBlob:
        """A CachedBlob over `remote`, whose content must have sha256 `digest`."""
        blob = CachedBlob(self, remote, digest, name=name)
        self.blobs.append(blob)
        return blob

    def stats(self) -> dict[str, object]:
        return {
            "cache_dir": str(self.root),
            "chunk_size": self.chunk_size,
            "capacity": self.capacity,
            "bytes_cached": self.used,
            "layers": [b.stats_dict() for b in self.blobs],
        }

    def close(self) -> None:
        for files in self._files.values():
            files.close()
        self._files.clear()
        shutil.rmtree(self.private_dir, ignore_errors=True)


MAX_SCAN_BLOB = 1 << 42


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except FileNotFoundError:
        return 0.0


def _remove_stale_private_dirs(private: Path) -> None:
    """Private caches of processes that are gone (crashed daemons)."""
    if not private.is_dir():
        return
    for child in private.iterdir():
        if child.name.isdigit() and not Path(f"/proc/{child.name}").exists():
            shutil.rmtree(child, ignore_errors=True)


class CachedBlob:
    """A remote Blob read through the persistent chunk cache."""

    def __init__(self, cache: BlobCache, remote: Blob, digest: str, *,
                 name: str | None = None) -> None:
        self.cache = cache
        self.remote = remote
        self.digest = digest
        self.name = name or remote.name
        self.files = cache.files_for(digest, remote.size)
        self.chunk_size = cache.chunk_size
        self.stats = CacheStats()
        self._inflight: dict[int, _Fetch] = {}
        self._last_end = -1
        self._streak = 0
        self._background: set[trio.CancelScope] = set()
        self._closed = False
        self._suspect = False  # failed a digest check: verify before serving
        #: awaited once by aclose (the owner of a group of blobs hooks in here)
        self.on_close: list[Callable[[], Awaitable[None]]] = []

    @property
    def size(self) -> int:
        return self.files.size

    def stats_dict(self) -> dict[str, object]:
        remote = getattr(self.remote, "stats", None)
        out: dict[str, object] = {"name": self.name, "digest": self.digest, "size": self.size,
                                  "chunks_cached": self.files.present_count,
                                  "chunks": self.files.nchunks}
        out.update(self.stats.as_dict())
        if remote is not None and hasattr(remote, "as_dict"):
            out.update(remote.as_dict())
        return out

    # ---------------------------------------------------------------- reads

    async def pread(self, offset: int, length: int) -> bytes:
        n = clamp(self.size, offset, length)
        if n == 0:
            return b""
        first, last = offset // self.chunk_size, (offset + n - 1) // self.chunk_size
        self.stats.reads += 1
        self.stats.bytes_read += n
        self.cache.pin(self.digest, first, last, +1)
        try:
            if self.size <= self.cache.whole_below or self._suspect:
                # small blobs, and blobs that once failed their digest check, are
                # fetched whole and verified before any byte is served
                first_needed, last_needed = 0, self.files.nchunks - 1
            else:
                first_needed, last_needed = first, last
            fetched = False
            while True:
                fetched |= await self._ensure(first_needed, last_needed, demand=True)
                if self.files.complete and not self.files.verified:
                    await self._verify()
                # a failed verification elsewhere may have dropped chunks while we waited:
                # check presence and read without a checkpoint in between
                if all(self.files.present(i) for i in range(first, last + 1)):
                    data = self.files.read(offset, n)
                    break
            self.cache.touch(self.digest, first, last)
        finally:
            self.cache.pin(self.digest, first, last, -1)
        if fetched:
            self.stats.cache_misses += 1
        else:
            self.stats.cache_hits += 1
        self._maybe_readahead(offset, n, last)
        return data

    def chunk_present(self, index: int) -> bool:
        """True if chunk `index` (of `chunk_size` bytes) is in the cache."""
        return self.files.present(index)

    async def prefetch(self, offset: int, length: int) -> int:
        """Bring [offset, offset+length) into the cache without reading it, as background
        work (not counted as a demand read); missing neighbouring chunks are fetched with
        one range request. Returns how many chunks were missing."""
        n = clamp(self.size, offset, length)
        if n == 0:
            return 0
        if self.size <= self.cache.whole_below or self._suspect:  # as pread: whole, verified
            first, last = 0, self.files.nchunks - 1
        else:
            first, last = offset // self.chunk_size, (offset + n - 1) // self.chunk_size
        missing = sum(1 for i in range(first, last + 1) if not self.files.present(i))
        self.stats.prefetch_chunks += missing
        if missing:
            await self._ensure(first, last, demand=False)
            if self.files.complete and not self.files.verified:
                await self._verify()
        return missing

    async def _ensure(self, first: int, last: int, *, demand: bool) -> bool:
        """Make chunks [first, last] present; True if this call had to wait for any fetch."""
        waited = False
        while True:
            missing = [i for i in range(first, last + 1) if not self.files.present(i)]
            if not missing:
                return waited
            waited = True
            own: list[_Fetch] = []
            shared: list[_Fetch] = []
            for i in missing:
                fetch = self._inflight.get(i)
                if fetch is not None:
                    if fetch not in shared:
                        shared.append(fetch)
                elif own and own[-1].last == i - 1 and i - own[-1].first < MAX_REQUEST_CHUNKS:
                    own[-1].last = i
                else:
                    own.append(_Fetch(i, i))
            for fetch in own:
                for i in range(fetch.first, fetch.last + 1):
                    self._inflight[i] = fetch
            if demand:
                self.cache.demand_started()
            try:
                async with trio.open_nursery() as nursery:
                    for fetch in own:
                        nursery.start_soon(self._run_fetch, fetch)
                    for fetch in shared:
                        nursery.start_soon(_wait_event, fetch.done)
            finally:
                if demand:
                    self.cache.demand_finished()
            for fetch in own + shared:
                if fetch.error is not None and not isinstance(fetch.error, trio.Cancelled):
                    raise fetch.error

    async def _run_fetch(self, fetch: _Fetch) -> None:
        try:
            offset = fetch.first * self.chunk_size
            length = min((fetch.last + 1) * self.chunk_size, self.size) - offset
            data = await self.remote.pread(offset, length)
            if len(data) != length:
                raise ObdfuseError(f"{self.name}: short read of {len(data)}/{length} bytes "
                                   f"at {offset}")
            await trio.to_thread.run_sync(self.files.store, fetch.first, data)
            self.stats.chunks_fetched += fetch.last - fetch.first + 1
            self.cache.added(self.files, fetch.first, fetch.last)
            if self.files.complete and not self.files.verified:
                await self._verify()
        except Exception as exc:  # handed to every reader of these chunks
            fetch.error = exc
        except BaseException as exc:  # cancelled: waiters retry on their own
            fetch.error = exc
            raise
        finally:
            for i in range(fetch.first, fetch.last + 1):
                if self._inflight.get(i) is fetch:
                    del self._inflight[i]
            fetch.done.set()

    async def _verify(self) -> None:
        """Check the digest of a complete blob; drop everything cached on mismatch."""
        actual = await trio.to_thread.run_sync(self.files.sha256)
        if actual == self.digest:
            self.files.mark_verified()
            self._suspect = False
            return
        if self.files.verified:
            return  # verified concurrently
        self.stats.verify_failures += 1
        self._suspect = True
        self.cache.drop_blob(self.files)
        msg = (f"{self.name}: content has digest {actual}, expected {self.digest}; "
               "dropped its cache")
        log.error(msg)
        raise CorruptDataError(msg)

    # ---------------------------------------------------------------- readahead / background

    def _maybe_readahead(self, offset: int, n: int, last: int) -> None:
        """Adaptive readahead: once a sequential streak covers a whole chunk, prefetch
        as many chunks ahead as the streak is long (capped), in the background."""
        sequential = offset == self._last_end
        self._streak = self._streak + n if sequential else n
        self._last_end = offset + n
        if not sequential or self._streak < self.chunk_size:
            return
        ahead = min(READAHEAD_MAX, max(READAHEAD_START, self._streak // self.chunk_size))
        end = min(self.files.nchunks - 1, last + ahead)
        todo = [i for i in range(last + 1, end + 1)
                if not self.files.present(i) and i not in self._inflight]
        if todo:
            self.stats.readahead_chunks += len(todo)
            self.spawn(self._ensure_quietly, todo[0], todo[-1])

    async def _ensure_quietly(self, first: int, last: int) -> None:
        try:
            await self._ensure(first, last, demand=False)
        except ObdfuseError as exc:
            log.debug("%s: readahead failed: %s", self.name, exc)

    def spawn(self, fn: Callable[..., Awaitable[None]], *args: object) -> None:
        """Run fn in the background (a trio system task cancelled by aclose)."""
        if self._closed:
            return
        scope = trio.CancelScope()
        self._background.add(scope)

        async def runner() -> None:
            try:
                with scope:
                    await fn(*args)
            except Exception as exc:  # a background failure must not crash the run
                log.warning("%s: background task failed: %s", self.name, exc)
            finally:
                self._background.discard(scope)

        trio.lowlevel.spawn_system_task(runner, name=f"obdfuse-bg {self.name}")

    async def fill(self, rate: RateLimit | None = None, run_chunks: int = 4) -> None:
        """Fetch every missing chunk, yielding to demand reads, at most `rate` bytes/s."""
        i = 0
        while i < self.files.nchunks and not self._closed:
            if self.files.present(i) or i in self._inflight:
                i += 1
                continue
            j = i
            while (j + 1 < self.files.nchunks and j + 1 - i < run_chunks
                   and not self.files.present(j + 1) and j + 1 not in self._inflight):
                j += 1
            await self.cache.wait_demand_idle()
            nbytes = min((j + 1) * self.chunk_size, self.size) - i * self.chunk_size
            if rate is not None:
                await rate.take(nbytes)
            await self._ensure(i, j, demand=False)
            self.stats.background_bytes += nbytes
            i = j + 1

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        for scope in list(self._background):
            scope.cancel()
        try:
            await self.remote.aclose()
        finally:
            hooks, self.on_close = self.on_close, []
            for hook in hooks:
                await hook()


class RateLimit:
    """A token bucket shared by background fills: at most `bytes_per_s` on average."""

    def __init__(self, bytes_per_s: float) -> None:
        if bytes_per_s <= 0:
            raise ObdfuseError("the background fetch rate must be positive")
        self.rate = bytes_per_s
        self._next = time.monotonic()

    async def take(self, nbytes: int) -> None:
        now = time.monotonic()
        start = max(now, self._next)
        self._next = start + nbytes / self.rate
        if start > now:
            await trio.sleep(start - now)


async def _wait_event(event: trio.Event) -> None:
    await event.wait()


async def background_fill(blobs: list[CachedBlob], rate: RateLimit | None) -> None:
    """Fill every blob, one after the other (run it in the daemon's nursery)."""
    for blob in blobs:
        try:
            await blob.fill(rate)
        except ObdfuseError as exc:
            log.warning("%s: background fetch stopped: %s", blob.name, exc)
