"""Where a conversion's source image comes from: an OCI layout or a registry.

`open_source(ref)` resolves `oci:DIR[:TAG]` through `obdfuse.convert.oci` and an
image reference (`host/repo[:tag|@digest]`) through `obdfuse.registry`; registry
layers are downloaded into the work area (ranged GETs, digest-checked while they
arrive) before they are applied. Both give a `SourceImage` whose `open_blob`
streams a layer blob.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from obdfuse.convert.oci import (
    LAYER_TYPES,
    Descriptor,
    DigestReader,
    OciLayout,
    Platform,
    SourceImage,
    check_digest,
    parse_layout_ref,
)
from obdfuse.convert.progress import Progress
from obdfuse.errors import CorruptDataError, FormatError

DOWNLOAD_CHUNK = 16 << 20


@dataclass
class RegistrySettings:
    """How to reach a registry (mirrors the CLI options)."""

    creds: str | None = None
    plain_http: bool | None = None
    timeout: float = 60.0  # seconds of retrying before a registry request fails

    def options(self, platform=None):
        """RegistryOptions for obdfuse.registry (imported lazily)."""
        from obdfuse.registry.blob import OutagePolicy
        from obdfuse.registry.session import RegistryOptions

        extra = {"platform": platform} if platform is not None else {}
        return RegistryOptions(
            creds=self.creds,
            plain_http=self.plain_http,
            policy=OutagePolicy("fail", self.timeout),
            **extra,
        )


def open_source(
    ref: str,
    *,
    platform: Platform | None,
    download_dir: Path,
    registry: RegistrySettings,
    progress: Progress,
) -> SourceImage:
    """The source image `ref` (an OCI layout or a registry reference)."""
    layout = parse_layout_ref(ref)
    if layout is not None:
        path, tag = layout
        return OciLayout(path).resolve(tag, platform=platform)
    return _RegistrySource(ref, platform, download_dir, registry, progress).resolve()


class _RegistrySource:
    def __init__(
        self,
        ref: str,
        platform: Platform | None,
        download_dir: Path,
        settings: RegistrySettings,
        progress: Progress,
    ) -> None:
        self.ref = ref
        self.platform = platform or Platform.host()
        self.download_dir = download_dir
        self.settings = settings
        self.progress = progress

    def _open(self):
        from obdfuse.registry import manifest as mf
        from obdfuse.registry.session import Registry

        platform = mf.Platform(
            self.platform.os, self.platform.architecture, self.platform.variant or None
        )
        return Registry.open(self.ref, self.settings.options(platform))

    def resolve(self) -> SourceImage:
        import trio

        async def resolve():
            registry = self._open()
            try:
                return registry, await registry.resolve()
            except BaseException:
                await registry.aclose()
                raise

        registry, image = trio.run(resolve)
        trio.run(registry.aclose)
        manifest = image.manifest
        layers = [
            Descriptor(d.media_type, check_digest(d.digest), d.size, dict(d.annotations))
            for d in manifest.layers
        ]
        for i, layer in enumerate(layers):
            if layer.media_type not in LAYER_TYPES:
                raise FormatError(
                    f"{self.ref}: layer {i} ({layer.digest}) has unsupported media type "
                    f"{layer.media_type!r}"
                )
        config = manifest.config
        manifest_desc = Descriptor(manifest.media_type, image.manifest_digest, 0)
        pinned = str(image.reference)
        self.ref = pinned
        return SourceImage(
            name=pinned,
            manifest_desc=manifest_desc,
            manifest_bytes=b"",
            config_desc=Descriptor(config.media_type, config.digest, config.size),
            config_bytes=image.config,
            layers=layers,
            open_blob=self.open_blob,
        )

    def open_blob(self, desc: Descriptor) -> BinaryIO:
        """Download the blob into the work area (verified), then stream it from there."""
        path = self.download_dir / desc.digest.replace(":", "-")
        if not path.exists():
            self._download(desc, path)
        f = open(path, "rb")  # noqa: SIM115 - DigestReader owns and closes it
        return DigestReader(f, desc, f"{self.ref} layer {desc.digest}")  # type: ignore[return-value]

    def _download(self, desc: Descriptor, path: Path) -> None:
        import trio

        from obdfuse.asyncio_bridge import run_in_asyncio

        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".part")
        h = hashlib.new(desc.digest.split(":", 1)[0])

        async def fetch_all(out: BinaryIO, tick) -> None:
            registry = self._open()
            try:
                repo = registry.ref.repository
                pos = 0
                while pos < desc.size:
                    n = min(DOWNLOAD_CHUNK, desc.size - pos)
                    got = await run_in_asyncio(
                        registry.client.fetch_range,
                        repo,
                        desc.digest,
                        pos,
                        n,
                        self.settings.timeout,
                    )
                    data = got.data
                    if len(data) != n:
                        raise CorruptDataError(
                            f"{self.ref} layer {desc.digest}: short read at {pos}"
                        )
                    h.update(data)
                    await trio.to_thread.run_sync(out.write, data)
                    pos += n
                    tick(n)
            finally:
                await registry.aclose()

        try:
            with (
                open(tmp, "wb") as out,
                self.progress.bar(f"download {desc.digest[7:19]}", desc.size) as bar,
            ):
                if desc.size:
                    trio.run(fetch_all, out, bar.update)
            got = f"{h.name}:{h.hexdigest()}"
            if got != desc.digest:
                raise CorruptDataError(
                    f"{self.ref} layer {desc.digest}: downloaded data has digest {got}"
                )
            os.replace(tmp, path)
        finally:
            if tmp.exists():
                tmp.unlink()
