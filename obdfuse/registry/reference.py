"""Image references: `host[:port]/repo[:tag|@sha256:...]` (the distribution grammar).

Parsing follows distribution's reference grammar through `docker-image-py`;
this module adds the defaults a client needs: Docker Hub normalisation, tag
`latest`, and the transport (plain HTTP for loopback registries, HTTPS
otherwise, unless forced).
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from docker_image import reference as _grammar

from obdfuse.errors import ObdfuseError

DOCKER_HUB = "registry-1.docker.io"
DIGEST_RE = re.compile(r"sha256:[0-9a-f]{64}")


class ReferenceError(ObdfuseError):
    """Text that is not a valid image reference."""


@dataclass(frozen=True)
class ImageReference:
    """A parsed image reference with defaults applied."""

    host: str  # host[:port] as used in URLs
    repository: str  # path inside the registry, e.g. library/ubuntu
    tag: str | None
    digest: str | None
    plain_http: bool

    @property
    def reference(self) -> str:
        """What goes after /manifests/: the digest if pinned, else the tag."""
        return self.digest or self.tag or "latest"

    @property
    def base_url(self) -> str:
        scheme = "http" if self.plain_http else "https"
        return f"{scheme}://{self.host}"

    def with_reference(self, *, digest: str | None = None, tag: str | None = None):
        return ImageReference(self.host, self.repository, tag, digest, self.plain_http)

    def __str__(self) -> str:
        text = f"{self.host}/{self.repository}"
        if self.tag:
            text += f":{self.tag}"
        if self.digest:
            text += f"@{self.digest}"
        return text


def is_loopback(host: str) -> bool:
    """True for localhost / 127.0.0.0/8 / ::1, with or without a port."""
    name = host
    if name.startswith("["):
        name = name[1 : name.index("]")]
    elif name.count(":") == 1:
        name = name.split(":", 1)[0]
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def looks_like_reference(text: str) -> bool:
    """Heuristic for CLIs: `host[:port]/repo...` whose first part names a registry host."""
    first, sep, _ = text.partition("/")
    if not sep or text.startswith(("/", ".")):
        return False
    return "." in first or ":" in first or first == "localhost"


def parse_reference(text: str, *, plain_http: bool | None = None) -> ImageReference:
    """Parse an image reference; `plain_http=None` picks HTTP only for loopback hosts."""
    try:
        parsed = _grammar.Reference.parse(text.strip())
    except Exception as exc:
        raise ReferenceError(f"not an image reference: {text!r} ({exc})") from None
    host, path = parsed.split_hostname()
    if path != path.lower():
        raise ReferenceError(f"not an image reference: {text!r} (repository must be lowercase)")
    if not host:
        host = DOCKER_HUB
        if "/" not in path:
            path = f"library/{path}"
    elif host in ("docker.io", "index.docker.io"):
        host = DOCKER_HUB
    digest = parsed["digest"]
    if digest is not None and not DIGEST_RE.fullmatch(digest):
        raise ReferenceError(f"{text!r}: only sha256 digests are supported")
    tag = parsed["tag"]
    if tag is None and digest is None:
        tag = "latest"
    if plain_http is None:
        plain_http = is_loopback(host)
    return ImageReference(host, path, tag, digest, plain_http)
