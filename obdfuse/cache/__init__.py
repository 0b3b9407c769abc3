"""Caching of remote blobs: a persistent, verified, size-bounded range cache on disk
(`BlobCache`, `CachedBlob`), background fill, and an in-memory LRU of hot blocks.

Knows nothing of formats: it caches bytes at blob offsets.
"""

from obdfuse.cache.blob_cache import BlobCache, CachedBlob
from obdfuse.cache.memory import BlockLRU

__all__ = ["BlobCache", "BlockLRU", "CachedBlob"]
