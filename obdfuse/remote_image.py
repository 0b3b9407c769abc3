"""Image reference → manifest → one cached, lazily fetched Blob per layer.

Composes `obdfuse.registry` (resolve, RegistryBlob) with `obdfuse.cache`
(BlobCache, CachedBlob, background fill). `obdfuse.image.open_image` turns the
blobs into layers and a Stack. Every open remote image is listed in
`OPEN_IMAGES`, whose `remote_stats()` the FUSE stat file publishes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import trio

from obdfuse.cache.blob_cache import (
    DEFAULT_CACHE_DIR,
    DEFAULT_CHUNK,
    BlobCache,
    CachedBlob,
    RateLimit,
    background_fill,
)
from obdfuse.cache.memory import BlockCachedBlob, BlockLRU
from obdfuse.errors import FormatError
from obdfuse.registry.client import ResolvedImage
from obdfuse.registry.manifest import overlaybd_layer
from obdfuse.registry.session import Registry, RegistryOptions

log = logging.getLogger(__name__)


@dataclass
class RemoteOptions:
    """Everything a remote image needs beyond its reference (mirrors the mount options)."""

    registry: RegistryOptions = field(default_factory=RegistryOptions)
    cache_dir: Path = DEFAULT_CACHE_DIR
    cache_size: int | None = None
    chunk_size: int = DEFAULT_CHUNK
    background_fetch: bool = False
    background_rate: float = 50 << 20  # bytes/s
    require_overlaybd: bool = False


@dataclass
class RemoteImage:
    """An opened image reference: its manifest and one CachedBlob per layer (bottom first)."""

    registry: Registry
    image: ResolvedImage
    cache: BlobCache
    blobs: list[CachedBlob]
    hot_blocks: BlockLRU = field(default_factory=BlockLRU)

    def stats(self) -> dict[str, object]:
        out = self.cache.stats()
        out["image"] = str(self.image.reference)
        out["layers"] = [b.stats_dict() for b in self.blobs]
        out["hot_blocks"] = self.hot_blocks.stats()
        return out

    def close_with_blobs(self) -> None:
        """Close the client and release the cache once every layer blob is closed
        (so closing the Stack built on the blobs closes everything)."""
        remaining = {id(b) for b in self.blobs}

        def make_hook(blob: CachedBlob):
            async def hook() -> None:
                remaining.discard(id(blob))
                if not remaining:
                    await self._release()

            return hook

        for blob in self.blobs:
            blob.on_close.append(make_hook(blob))

    def start_background_fill(self, rate: float) -> None:
        """Download the rest of every layer at low priority (yields to demand reads)."""
        limit = RateLimit(rate)
        if self.blobs:
            self.blobs[0].spawn(background_fill, self.blobs, limit)

    async def aclose(self) -> None:
        """Close every layer blob, the client and the cache."""
        try:
            for blob in self.blobs:
                await blob.aclose()
        finally:
            await self._release()

    async def _release(self) -> None:
        if self in OPEN_IMAGES:
            OPEN_IMAGES.remove(self)
        try:
            await self.registry.aclose()
        finally:
            self.cache.close()


OPEN_IMAGES: list[RemoteImage] = []


def remote_stats() -> dict[str, object]:
    """Lazy-loading statistics of every open remote image (for the stat file)."""
    return {"remote": [image.stats() for image in OPEN_IMAGES]}


async def open_remote_image(spec: str, options: RemoteOptions | None = None) -> RemoteImage:
    """Resolve `spec` and wrap each layer blob in the persistent cache."""
    options = options or RemoteOptions()
    registry = Registry.open(spec, options.registry)
    try:
        image = await registry.resolve()
        if options.require_overlaybd:
            for layer in image.manifest.layers:
                if overlaybd_layer(layer) is None:
                    raise FormatError(f"{spec}: layer {layer.digest} is not an overlaybd layer "
                                      "(no overlaybd annotations)")
        cache = await trio.to_thread.run_sync(
            lambda: BlobCache(options.cache_dir, chunk_size=options.chunk_size,
                              capacity=options.cache_size))
    except BaseException:
        await registry.aclose()
        raise
    blobs = [cache.wrap(remote, remote.digest, name=f"{image.reference.repository}@"
                        f"{remote.digest[:19]}") for remote in registry.layer_blobs(image)]
    remote = RemoteImage(registry, image, cache, blobs)
    OPEN_IMAGES.append(remote)
    if options.background_fetch:
        remote.start_background_fill(options.background_rate)
    log.info("opened %s (%d layers)", image.reference, len(blobs))
    return remote


async def open_remote_layers(spec: str, options: RemoteOptions | None = None):
    """Open an image reference as sealed layers (bottom first) over cached blobs.

    Closing the layers (e.g. through `Stack.aclose`) closes the remote image.
    """
    from obdfuse.layers.sealed import open_layer



    remote = await open_remote_image(spec, options)
    layers = []
    try:
        for blob, desc in zip(remote.blobs, remote.image.manifest.layers, strict=True):
            try:
                layer = await open_layer(blob)
            except FormatError as exc:
                if overlaybd_layer(desc) is None:
                    raise FormatError(
                        f"{spec}: layer {desc.digest} ({desc.media_type}) is not an overlaybd "
                        "layer; convert the image first (obdfuse convert)") from exc
                raise
            if "zfile" in layer.wrapping:  # keep hot decompressed blocks in memory
                layer.blob = BlockCachedBlob(layer.blob, remote.hot_blocks)
            layers.append(layer)
    except BaseException:
        await remote.aclose()
        raise
    remote.close_with_blobs()
    return layers, remote
