"""An in-memory LRU of hot decompressed blocks, bounded in bytes (cachetools).

Readers that decompress (ZFile) may consult it keyed by (blob name, block
offset) so that repeated small reads of one block decompress it once.
"""

from __future__ import annotations

from collections.abc import Hashable

from cachetools import LRUCache


class BlockLRU:
    """Bytes values under hashable keys, evicting least recently used past `max_bytes`."""

    def __init__(self, max_bytes: int = 64 << 20) -> None:
        self._cache: LRUCache[Hashable, bytes] = LRUCache(maxsize=max_bytes, getsizeof=len)
        self.hits = 0
        self.misses = 0

    def get(self, key: Hashable) -> bytes | None:
        value = self._cache.get(key)
        if value is None:
            self.misses += 1
        else:
            self.hits += 1
        return value

    def put(self, key: Hashable, value: bytes) -> None:
        if len(value) <= self._cache.maxsize:
            self._cache[key] = value

    @property
    def bytes_used(self) -> int:
        return int(self._cache.currsize)

    def stats(self) -> dict[str, int]:
        return {"hits": self.hits, "misses": self.misses, "bytes": self.bytes_used}


class BlockCachedBlob:
    """A Blob whose aligned blocks are kept in a shared BlockLRU (e.g. over a ZFile view,
    so hot blocks are decompressed once). Misses are read from the inner Blob in one
    pread per run of neighbouring missing blocks."""

    def __init__(self, inner, lru: BlockLRU, block_size: int = 4096) -> None:
        self.inner = inner
        self.lru = lru
        self.block_size = block_size
        self.name = inner.name
        self._key = (id(self), inner.name)

    @property
    def size(self) -> int:
        return self.inner.size

    async def pread(self, offset: int, length: int) -> bytes:
        from obdfuse.blob import clamp

        n = clamp(self.size, offset, length)
        if n == 0:
            return b""
        bs = self.block_size
        first, last = offset // bs, (offset + n - 1) // bs
        blocks: dict[int, bytes] = {}
        run: list[int] = []
        for i in range(first, last + 2):
            cached = self.lru.get((self._key, i)) if i <= last else None
            if cached is not None:
                blocks[i] = cached
            if (cached is not None or i > last) and run:
                data = await self.inner.pread(run[0] * bs, len(run) * bs)
                for j, b in enumerate(run):
                    piece = data[j * bs:(j + 1) * bs]
                    blocks[b] = piece
                    self.lru.put((self._key, b), piece)
                run = []
            elif cached is None and i <= last:
                run.append(i)
        joined = b"".join(blocks[i] for i in range(first, last + 1))
        start = offset - first * bs
        return joined[start:start + n]

    async def aclose(self) -> None:
        await self.inner.aclose()
