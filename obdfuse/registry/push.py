"""Upload local overlaybd layer files as an image: blobs, image config, manifest.

Layers go up as-is (raw LSMT, ZFile or tar-wrapped: readers detect the shape,
spec §4.2) with the overlaybd annotations of spec §5.2; the config's diff_ids
are the blob digests (spec §4.4).
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import trio

from obdfuse.asyncio_bridge import run_in_asyncio
from obdfuse.errors import ObdfuseError
from obdfuse.registry import manifest as mf
from obdfuse.registry.client import file_digest
from obdfuse.registry.session import Registry


@dataclass(frozen=True)
class PushedImage:
    reference: str  # host/repo@digest
    manifest_digest: str
    layers: list[mf.Descriptor]


async def push_layers(
    registry: Registry,
    layer_paths: list[Path],
    *,
    oci: bool = False,
    fs_type: str | None = "ext4",
    chunk_size: int = 32 << 20,
    progress: Callable[[str, int, int], None] | None = None,
) -> PushedImage:
    """Upload `layer_paths` (bottom first) and tag them as `registry.ref`.

    `progress(name, done_bytes_delta, total_bytes)` is called as bytes go out.
    """
    ref = registry.ref
    if ref.digest:
        raise ObdfuseError(f"{ref}: push needs a tag, not a digest")
    if not layer_paths:
        raise ObdfuseError("nothing to push: no layers")
    layer_type = mf.OCI_LAYER_TAR if oci else mf.DOCKER_LAYER_TAR
    descriptors: list[mf.Descriptor] = []
    for path in layer_paths:
        digest, size = await trio.to_thread.run_sync(file_digest, path)
        name = path.name

        def tick(n: int, _name: str = name, _size: int = size) -> None:
            if progress:
                progress(_name, n, _size)

        await run_in_asyncio(_upload, registry, path, digest, size, chunk_size, tick)
        descriptors.append(mf.Descriptor(layer_type, digest, size,
                                         mf.overlaybd_annotations(digest, size, fs_type)))
    config = mf.image_config([d.digest for d in descriptors], registry.options.platform)
    config_desc = mf.Descriptor(mf.OCI_CONFIG if oci else mf.DOCKER_CONFIG,
                                mf.sha256_digest(config), len(config))
    with tempfile.NamedTemporaryFile() as tmp:
        tmp.write(config)
        tmp.flush()
        await run_in_asyncio(_upload, registry, Path(tmp.name), config_desc.digest,
                             len(config), chunk_size, None)
    manifest_type = mf.OCI_MANIFEST if oci else mf.DOCKER_MANIFEST
    body = mf.build_manifest(config_desc, descriptors, manifest_type)
    digest = await run_in_asyncio(registry.client.put_manifest, ref.repository,
                                  ref.tag or "latest", body, manifest_type,
                                  registry.options.policy.client_deadline)
    return PushedImage(f"{ref.host}/{ref.repository}@{digest}", digest, descriptors)


async def _upload(registry: Registry, path: Path, digest: str, size: int, chunk_size: int,
                  tick: Callable[[int], None] | None) -> bool:
    # progress callbacks run on the asyncio thread; they only bump counters
    return await registry.client.upload_blob(registry.ref.repository, path, digest, size,
                                             chunk_size=chunk_size, progress=tick,
                                             deadline=registry.options.policy.client_deadline)
