"""Sans-IO parsing of OCI / Docker v2 manifests, indexes and image configs.

Pure functions on bytes: media types, descriptors, platform selection from an
index, and the overlaybd layer annotations (spec §5.1, §5.2). Bounds and types
are checked; anything malformed raises FormatError.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from obdfuse.errors import CorruptDataError, FormatError

# spec §5.1 and the OCI / Docker schema2 media types
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER_TAR = "application/vnd.docker.image.rootfs.diff.tar"

MANIFEST_TYPES = (OCI_MANIFEST, DOCKER_MANIFEST)
INDEX_TYPES = (OCI_INDEX, DOCKER_MANIFEST_LIST)
ACCEPT = ", ".join((*MANIFEST_TYPES, *INDEX_TYPES))

MAX_MANIFEST_BYTES = 4 << 20  # distribution's own limit for manifests
MAX_LAYERS = 4096

# spec §5.2: layer descriptor annotations
ANNOTATION_PREFIX = "containerd.io/snapshot/overlaybd/"
A_BLOB_DIGEST = ANNOTATION_PREFIX + "blob-digest"
A_BLOB_SIZE = ANNOTATION_PREFIX + "blob-size"
A_VERSION = ANNOTATION_PREFIX + "version"
A_FS_TYPE = ANNOTATION_PREFIX + "blob-fs-type"
A_ACCELERATION = ANNOTATION_PREFIX + "acceleration-layer"
OVERLAYBD_VERSION = "0.1.0"


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def check_digest(digest: str) -> str:
    """Validate `sha256:<64 hex>`; return it."""
    algo, _, hexd = digest.partition(":") if isinstance(digest, str) else ("", "", "")
    if algo != "sha256" or len(hexd) != 64 or any(c not in "0123456789abcdef" for c in hexd):
        raise FormatError(f"unsupported or malformed digest: {digest!r}")
    return digest


def verify_digest(data: bytes, digest: str, what: str) -> None:
    """Raise CorruptDataError unless sha256(data) == digest."""
    actual = sha256_digest(data)
    if actual != check_digest(digest):
        raise CorruptDataError(f"{what}: digest mismatch (expected {digest}, got {actual})")


@dataclass(frozen=True)
class Platform:
    os: str = "linux"
    architecture: str = "amd64"
    variant: str | None = None

    @classmethod
    def parse(cls, text: str) -> Platform:
        """`linux/arm64/v8` → Platform."""
        parts = text.split("/")
        if len(parts) not in (2, 3) or not all(parts):
            raise FormatError(f"not a platform: {text!r} (use os/arch[/variant])")
        return cls(parts[0], parts[1], parts[2] if len(parts) == 3 else None)


@dataclass(frozen=True)
class Descriptor:
    media_type: str
    digest: str
    size: int
    annotations: dict[str, str] = field(default_factory=dict)
    platform: Platform | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"mediaType": self.media_type, "digest": self.digest,
                               "size": self.size}
        if self.annotations:
            out["annotations"] = dict(self.annotations)
        return out


@dataclass(frozen=True)
class Manifest:
    media_type: str
    config: Descriptor
    layers: list[Descriptor]
    annotations: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Index:
    media_type: str
    manifests: list[Descriptor]


@dataclass(frozen=True)
class OverlaybdLayer:
    """The overlaybd annotations of one layer descriptor (spec §5.2)."""

    digest: str
    size: int
    version: str
    fs_type: str | None
    acceleration: bool


def _load(data: bytes, what: str) -> dict[str, Any]:
    if len(data) > MAX_MANIFEST_BYTES:
        raise FormatError(f"{what}: {len(data)} bytes exceeds the {MAX_MANIFEST_BYTES} limit")
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise FormatError(f"{what}: not JSON ({exc})") from None
    if not isinstance(doc, dict):
        raise FormatError(f"{what}: not a JSON object")
    return doc


def _str_map(value: Any, what: str) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise FormatError(f"{what}: annotations must map strings to strings")
    return dict(value)


def parse_descriptor(obj: Any, what: str) -> Descriptor:
    if not isinstance(obj, dict):
        raise FormatError(f"{what}: descriptor is not an object")
    media_type, digest, size = obj.get("mediaType"), obj.get("digest"), obj.get("size")
    if not isinstance(media_type, str) or not isinstance(digest, str):
        raise FormatError(f"{what}: descriptor lacks mediaType/digest")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0 or size >= 1 << 63:
        raise FormatError(f"{what}: bad descriptor size {size!r}")
    check_digest(digest)
    platform = None
    if isinstance(obj.get("platform"), dict):
        p = obj["platform"]
        platform = Platform(str(p.get("os", "")), str(p.get("architecture", "")),
                            p.get("variant") if isinstance(p.get("variant"), str) else None)
    return Descriptor(media_type, digest, size, _str_map(obj.get("annotations"), what), platform)


def media_type_of(data: bytes, content_type: str | None) -> str:
    """The document's own mediaType, else the HTTP Content-Type (parameters stripped)."""
    doc = _load(data, "manifest")
    mt = doc.get("mediaType")
    if isinstance(mt, str) and mt:
        return mt
    if content_type:
        return content_type.split(";")[0].strip()
    if "manifests" in doc:
        return OCI_INDEX
    return OCI_MANIFEST


def parse_manifest(data: bytes, media_type: str, what: str = "manifest") -> Manifest:
    doc = _load(data, what)
    if doc.get("schemaVersion") != 2:
        raise FormatError(f"{what}: schemaVersion {doc.get('schemaVersion')!r} is not 2")
    layers = doc.get("layers")
    if not isinstance(layers, list) or len(layers) > MAX_LAYERS:
        raise FormatError(f"{what}: layers must be a list of at most {MAX_LAYERS}")
    return Manifest(
        media_type,
        parse_descriptor(doc.get("config"), f"{what} config"),
        [parse_descriptor(layer, f"{what} layer {i}") for i, layer in enumerate(layers)],
        _str_map(doc.get("annotations"), what),
    )


def parse_index(data: bytes, media_type: str, what: str = "index") -> Index:
    doc = _load(data, what)
    entries = doc.get("manifests")
    if not isinstance(entries, list) or len(entries) > MAX_LAYERS:
        raise FormatError(f"{what}: manifests must be a list")
    return Index(media_type, [parse_descriptor(e, f"{what} entry {i}")
                              for i, e in enumerate(entries)])


def select_platform(index: Index, want: Platform) -> Descriptor:
    """The index entry for `want` (variant matched when both sides name one)."""
    candidates = [
        d for d in index.manifests
        if d.platform and d.platform.os == want.os
        and d.platform.architecture == want.architecture
        and (want.variant is None or d.platform.variant in (None, want.variant))
    ]
    if not candidates:
        have = sorted({f"{d.platform.os}/{d.platform.architecture}"
                       for d in index.manifests if d.platform})
        raise FormatError(
            f"image index has no manifest for {want.os}/{want.architecture} (has: {have})"
        )
    return candidates[0]


def overlaybd_layer(desc: Descriptor) -> OverlaybdLayer | None:
    """The overlaybd annotations of a layer, or None for a plain OCI layer (spec §5.2)."""
    ann = desc.annotations
    if A_BLOB_DIGEST not in ann or A_BLOB_SIZE not in ann:
        return None
    digest = check_digest(ann[A_BLOB_DIGEST])
    try:
        size = int(ann[A_BLOB_SIZE])
    except ValueError:
        raise FormatError(f"layer {desc.digest}: bad blob-size {ann[A_BLOB_SIZE]!r}") from None
    if digest != desc.digest or size != desc.size:
        raise FormatError(f"layer {desc.digest}: overlaybd annotations disagree with descriptor")
    return OverlaybdLayer(digest, size, ann.get(A_VERSION, ""), ann.get(A_FS_TYPE),
                          ann.get(A_ACCELERATION) == "yes")


def overlaybd_annotations(digest: str, size: int, fs_type: str | None = "ext4") -> dict[str, str]:
    """Annotations for a native overlaybd layer descriptor (spec §5.2)."""
    ann = {A_BLOB_DIGEST: digest, A_BLOB_SIZE: str(size), A_VERSION: OVERLAYBD_VERSION}
    if fs_type:
        ann[A_FS_TYPE] = fs_type
    return ann


def image_config(diff_ids: list[str], platform: Platform = Platform()) -> bytes:
    """A minimal image config; diff_ids == blob digests for overlaybd layers (spec §4.4)."""
    doc = {
        "architecture": platform.architecture,
        "os": platform.os,
        "config": {},
        "rootfs": {"type": "layers", "diff_ids": list(diff_ids)},
    }
    if platform.variant:
        doc["variant"] = platform.variant
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


def build_manifest(config: Descriptor, layers: list[Descriptor], media_type: str) -> bytes:
    """Serialise a schema-2 manifest (OCI or Docker)."""
    doc = {
        "schemaVersion": 2,
        "mediaType": media_type,
        "config": config.to_json(),
        "layers": [layer.to_json() for layer in layers],
    }
    return json.dumps(doc, indent=2).encode()


def parse_config_diff_ids(data: bytes) -> list[str]:
    doc = _load(data, "image config")
    rootfs = doc.get("rootfs")
    ids = rootfs.get("diff_ids") if isinstance(rootfs, dict) else None
    if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
        raise FormatError("image config: rootfs.diff_ids missing")
    return ids
