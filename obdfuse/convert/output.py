"""The converted image: config, manifest and where they go (OCI layout or registry).

The config keeps everything of the source's (entrypoint, env, labels, history…)
except `rootfs.diff_ids`, which become the overlaybd blob digests (spec §4.4); a
history entry is prepended for the base layer so history and layers still line
up. Every layer descriptor carries the overlaybd annotations of spec §5.2.
"""

from __future__ import annotations

import copy
import functools
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from obdfuse.convert.layerbuild import BuiltLayer
from obdfuse.convert.oci import (
    DOCKER_CONFIG,
    DOCKER_LAYER_TAR,
    DOCKER_MANIFEST,
    OCI_CONFIG,
    OCI_LAYER_TAR,
    OCI_MANIFEST,
    Descriptor,
    OciLayout,
    digest_of,
    parse_layout_ref,
)
from obdfuse.convert.progress import Progress
from obdfuse.convert.source import RegistrySettings

# spec §5.2 layer annotations
A_PREFIX = "containerd.io/snapshot/overlaybd/"
A_BLOB_DIGEST = A_PREFIX + "blob-digest"
A_BLOB_SIZE = A_PREFIX + "blob-size"
A_VERSION = A_PREFIX + "version"
A_FS_TYPE = A_PREFIX + "blob-fs-type"
OVERLAYBD_VERSION = "0.1.0"

EPOCH = "1970-01-01T00:00:00Z"


@dataclass(frozen=True)
class MediaTypes:
    manifest: str
    config: str
    layer: str


OCI_TYPES = MediaTypes(OCI_MANIFEST, OCI_CONFIG, OCI_LAYER_TAR)
DOCKER_TYPES = MediaTypes(DOCKER_MANIFEST, DOCKER_CONFIG, DOCKER_LAYER_TAR)


@dataclass(frozen=True)
class PublishedImage:
    """Where the image went and what it is."""

    destination: str
    manifest_digest: str
    manifest: bytes
    config: bytes
    layers: list[Descriptor]


def layer_descriptor(layer: BuiltLayer, types: MediaTypes, fstype: str) -> Descriptor:
    return Descriptor(
        types.layer,
        layer.digest,
        layer.size,
        {
            A_BLOB_DIGEST: layer.digest,
            A_BLOB_SIZE: str(layer.size),
            A_VERSION: OVERLAYBD_VERSION,
            A_FS_TYPE: fstype,
        },
    )


def overlaybd_config(
    source: dict[str, Any], layers: list[BuiltLayer], *, base_comment: str
) -> bytes:
    """The source config with diff_ids = blob digests and a history entry for the base."""
    cfg = copy.deepcopy(source)
    cfg["rootfs"] = {"type": "layers", "diff_ids": [layer.digest for layer in layers]}
    history = cfg.get("history")
    if isinstance(history, list):
        cfg["history"] = [{"created": EPOCH, "created_by": base_comment}, *history]
    return json.dumps(cfg, separators=(",", ":")).encode()


def new_config(
    layers: list[BuiltLayer],
    *,
    architecture: str,
    container_config: dict[str, Any],
    created: str,
    history: list[str],
) -> bytes:
    """A fresh image config (for `obdfuse build`)."""
    cfg = {
        "created": created,
        "architecture": architecture,
        "os": "linux",
        "config": container_config,
        "rootfs": {"type": "layers", "diff_ids": [layer.digest for layer in layers]},
        "history": [{"created": created, "created_by": h} for h in history],
    }
    return json.dumps(cfg, separators=(",", ":")).encode()


def manifest_bytes(config: Descriptor, layers: list[Descriptor], types: MediaTypes) -> bytes:
    doc = {
        "schemaVersion": 2,
        "mediaType": types.manifest,
        "config": config.to_json(),
        "layers": [d.to_json() for d in layers],
    }
    return json.dumps(doc, indent=2).encode()


def publish(
    destination: str,
    layers: list[BuiltLayer],
    config: bytes,
    *,
    types: MediaTypes,
    fstype: str,
    registry: RegistrySettings,
    progress: Progress,
) -> PublishedImage:
    """Write the image to an OCI layout (`oci:DIR[:TAG]`) or push it to a registry."""
    descs = [layer_descriptor(layer, types, fstype) for layer in layers]
    config_desc = Descriptor(types.config, digest_of(config), len(config))
    manifest = manifest_bytes(config_desc, descs, types)
    layout = parse_layout_ref(destination)
    if layout is not None:
        path, tag = layout
        out = OciLayout(path)
        out.init()
        for layer, desc in zip(layers, descs, strict=True):
            out.put_file(layer.path, desc)
        out.put_bytes(config, types.config)
        mdesc = out.put_bytes(manifest, types.manifest)
        out.tag(mdesc, tag or "latest")
        return PublishedImage(destination, mdesc.digest, manifest, config, descs)
    digest = _push(destination, layers, descs, config, manifest, types, registry, progress)
    return PublishedImage(destination, digest, manifest, config, descs)


def _push(
    destination: str,
    layers: list[BuiltLayer],
    descs: list[Descriptor],
    config: bytes,
    manifest: bytes,
    types: MediaTypes,
    settings: RegistrySettings,
    progress: Progress,
) -> str:
    import trio

    from obdfuse.asyncio_bridge import run_in_asyncio
    from obdfuse.registry.session import Registry

    deadline = settings.timeout

    async def push() -> str:
        registry = Registry.open(destination, settings.options())
        try:
            ref = registry.ref
            if ref.digest:
                raise ValueError(f"{destination}: push to a tag, not a digest")
            client = registry.client
            for layer, desc in zip(layers, descs, strict=True):
                with progress.bar(f"upload {desc.digest[7:19]}", desc.size) as bar:
                    upload = functools.partial(
                        client.upload_blob, progress=bar.update, deadline=deadline
                    )
                    await run_in_asyncio(upload, ref.repository, layer.path, desc.digest, desc.size)
            with tempfile.NamedTemporaryFile() as tmp:
                tmp.write(config)
                tmp.flush()
                await run_in_asyncio(
                    functools.partial(client.upload_blob, deadline=deadline),
                    ref.repository,
                    Path(tmp.name),
                    digest_of(config),
                    len(config),
                )
            return await run_in_asyncio(
                client.put_manifest,
                ref.repository,
                ref.tag or "latest",
                manifest,
                types.manifest,
                deadline,
            )
        finally:
            await registry.aclose()

    return trio.run(push)
