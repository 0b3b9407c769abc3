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
