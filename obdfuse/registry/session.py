"""The trio-facing entry to a registry: open a client, resolve an image, make layer Blobs.

Every coroutine of `RegistryClient` runs on the asyncio bridge; this module is
the only place trio code needs to know that.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from obdfuse.asyncio_bridge import run_in_asyncio
from obdfuse.registry.auth import Credentials, credentials_from_docker_config
from obdfuse.registry.blob import OutagePolicy, RegistryBlob
from obdfuse.registry.client import RegistryClient, ResolvedImage
from obdfuse.registry.manifest import Platform
from obdfuse.registry.reference import ImageReference, parse_reference


@dataclass
class RegistryOptions:
    """User-facing knobs for registry access (mirrors the CLI options)."""

    creds: str | None = None  # USER:PASS; else ~/.docker/config.json
    plain_http: bool | None = None  # None: HTTP for loopback, HTTPS otherwise
    policy: OutagePolicy = field(default_factory=OutagePolicy)
    platform: Platform = field(default_factory=Platform)
    docker_config: Path | None = None
    request_timeout: float = 30.0


class Registry:
    """A client for one image reference's registry, usable from trio."""

    def __init__(self, ref: ImageReference, client: RegistryClient, options: RegistryOptions):
        self.ref = ref
        self.client = client
        self.options = options

    @classmethod
    def open(cls, spec: str | ImageReference, options: RegistryOptions | None = None) -> Registry:
        options = options or RegistryOptions()
        ref = spec if isinstance(spec, ImageReference) else parse_reference(
            spec, plain_http=options.plain_http)
        creds = (Credentials.parse(options.creds) if options.creds
                 else credentials_from_docker_config(ref.host, options.docker_config))
        client = RegistryClient.for_reference(ref, creds,
                                              request_timeout=options.request_timeout)
        return cls(ref, client, options)

    async def resolve(self) -> ResolvedImage:
        return await run_in_asyncio(self.client.resolve, self.ref, self.options.platform,
                                    self.options.policy.client_deadline)

    def layer_blobs(self, image: ResolvedImage) -> list[RegistryBlob]:
        """One RegistryBlob per manifest layer, bottom first."""
        return [
            RegistryBlob(self.client, image.reference.repository, layer.digest, layer.size,
                         self.options.policy, name=f"{image.reference.repository}@{layer.digest}")
            for layer in image.manifest.layers
        ]

    async def aclose(self) -> None:
        await run_in_asyncio(self.client.aclose)
