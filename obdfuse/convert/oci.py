"""OCI images on disk: image layouts (read and write), descriptors, manifests, platforms.

Reads a source image from an OCI image layout (`oci:DIR[:TAG]`): index.json →
(platform-selected) manifest → config and layer descriptors; OCI and Docker schema2
media types; layers stream through `DigestReader`, which fails on the first byte past
the declared size and on a digest mismatch at the end. Writes an output image into an
OCI layout (blobs + index.json tag), atomically per file.

Every digest is validated before it becomes a path; every JSON document is
size-bounded before it is read. Must not: talk HTTP (the registry room does).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform as host_platform
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from obdfuse.errors import CorruptDataError, FormatError
from obdfuse.fileio import atomic_output

# Media types (OCI image-spec media-types.md; Docker image manifest v2 schema 2).
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER_TAR = "application/vnd.docker.image.rootfs.diff.tar"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"

INDEX_TYPES = (OCI_INDEX, DOCKER_LIST)
MANIFEST_TYPES = (OCI_MANIFEST, DOCKER_MANIFEST)
LAYER_TYPES = (
    OCI_LAYER_TAR,
    OCI_LAYER_GZIP,
    OCI_LAYER_ZSTD,
    "application/vnd.oci.image.layer.nondistributable.v1.tar",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd",
    DOCKER_LAYER_TAR,
    DOCKER_LAYER_GZIP,
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
)
REF_NAME = "org.opencontainers.image.ref.name"

MAX_MANIFEST_BYTES = 4 << 20
MAX_CONFIG_BYTES = 64 << 20
_DIGEST_RE = re.compile(r"^(sha256:[a-f0-9]{64}|sha512:[a-f0-9]{128})$")


def check_digest(digest: str, where: str = "descriptor") -> str:
    """`digest` if it is a well-formed sha256/sha512 digest (safe to use in a path)."""
    if not isinstance(digest, str) or not _DIGEST_RE.match(digest):
        raise FormatError(f"{where}: invalid digest {digest!r}")
    return digest


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class Platform:
    """An OCI platform (os/architecture[/variant])."""

    os: str
    architecture: str
    variant: str = ""

    @classmethod
    def parse(cls, text: str) -> Platform:
        parts = text.split("/")
        if len(parts) not in (2, 3) or not all(parts):
            raise FormatError(f"platform {text!r}: expected os/arch[/variant], e.g. linux/amd64")
        return cls(*parts)

    @classmethod
    def host(cls) -> Platform:
        machine = host_platform.machine().lower()
        arch = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "i686": "386"}.get(
            machine, machine
        )
        return cls("linux", arch, "v8" if arch == "arm64" else "")

    def matches(self, spec: dict[str, Any]) -> bool:
        if spec.get("os") != self.os or spec.get("architecture") != self.architecture:
            return False
        want, have = self.variant, spec.get("variant", "")
        if self.architecture == "arm64":  # v8 is the default arm64 variant
            want, have = want or "v8", have or "v8"
        return not want or want == have

    def __str__(self) -> str:
        return "/".join(p for p in (self.os, self.architecture, self.variant) if p)


@dataclass
class Descriptor:
    """An OCI content descriptor."""

    media_type: str
    digest: str
    size: int
    annotations: dict[str, str] = field(default_factory=dict)
    platform: dict[str, Any] | None = None

    @classmethod
    def from_json(cls, obj: Any, where: str) -> Descriptor:
        if not isinstance(obj, dict):
            raise FormatError(f"{where}: descriptor is not an object")
        size = obj.get("size")
        if not isinstance(size, int) or size < 0:
            raise FormatError(f"{where}: descriptor size {size!r} is not a non-negative integer")
        annotations = obj.get("annotations") or {}
        if not isinstance(annotations, dict):
            raise FormatError(f"{where}: annotations are not an object")
        return cls(
            media_type=str(obj.get("mediaType", "")),
            digest=check_digest(obj.get("digest"), where),
            size=size,
            annotations={str(k): str(v) for k, v in annotations.items()},
            platform=obj.get("platform") if isinstance(obj.get("platform"), dict) else None,
        )

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"mediaType": self.media_type, "digest": self.digest}
        out["size"] = self.size
        if self.annotations:
            out["annotations"] = dict(self.annotations)
        if self.platform:
            out["platform"] = self.platform
        return out


def parse_json(data: bytes, where: str) -> Any:
    try:
        return json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise FormatError(f"{where}: not valid JSON: {exc}") from None


def parse_manifest(data: bytes, where: str) -> tuple[Descriptor, list[Descriptor]]:
    """(config, layers) of an OCI or Docker schema2 image manifest."""
    doc = parse_json(data, where)
    if not isinstance(doc, dict):
        raise FormatError(f"{where}: manifest is not an object")
    media_type = doc.get("mediaType", OCI_MANIFEST)
    if media_type in INDEX_TYPES or "manifests" in doc:
        raise FormatError(f"{where}: is an index, not an image manifest")
    if media_type not in MANIFEST_TYPES or doc.get("schemaVersion") != 2:
        raise FormatError(f"{where}: unsupported manifest type {media_type!r}")
    config = Descriptor.from_json(doc.get("config"), f"{where} config")
    layers_json = doc.get("layers")
    if not isinstance(layers_json, list):
        raise FormatError(f"{where}: no layers list")
    layers = [Descriptor.from_json(d, f"{where} layer {i}") for i, d in enumerate(layers_json)]
    for i, layer in enumerate(layers):
        if layer.media_type not in LAYER_TYPES:
            raise FormatError(
                f"{where}: layer {i} ({layer.digest}) has unsupported media type "
                f"{layer.media_type!r} (want a tar, tar+gzip or tar+zstd layer)"
            )
    return config, layers


def select_from_index(
    data: bytes, where: str, *, platform: Platform | None, tag: str | None
) -> Descriptor:
    """The manifest descriptor an index points to, by tag and/or platform."""
    doc = parse_json(data, where)
    if not isinstance(doc, dict) or not isinstance(doc.get("manifests"), list):
        raise FormatError(f"{where}: not an image index (no manifests list)")
    entries = [
        Descriptor.from_json(d, f"{where} manifest {i}") for i, d in enumerate(doc["manifests"])
    ]
    if tag is not None:
        entries = [d for d in entries if d.annotations.get(REF_NAME) == tag]
        if not entries:
            raise FormatError(f"{where}: no manifest tagged {tag!r}")
    if not entries:
        raise FormatError(f"{where}: the index lists no manifests")
    if len(entries) == 1 and (platform is None or entries[0].platform is None):
        return entries[0]
    want = platform or Platform.host()
    matching = [d for d in entries if d.platform is not None and want.matches(d.platform)]
    if matching:
        return matching[0]
    if platform is None and all(d.platform is None for d in entries):
        raise FormatError(f"{where}: {len(entries)} manifests and no tag to choose one (use :TAG)")
    have = ", ".join(str(Platform(**_platform_fields(d.platform))) for d in entries if d.platform)
    raise FormatError(f"{where}: no manifest for platform {want} (available: {have or 'none'})")


def _platform_fields(p: dict[str, Any]) -> dict[str, str]:
    return {
        "os": str(p.get("os", "?")),
        "architecture": str(p.get("architecture", "?")),
        "variant": str(p.get("variant", "")),
    }


class DigestReader:
    """A read-only stream over `fileobj` that verifies size and digest of what it yields.

    Raises CorruptDataError as soon as more than `size` bytes arrive, and at EOF if
    the size or digest differ. `on_read(n)` reports progress.
    """

    def __init__(
        self,
        fileobj: BinaryIO,
        desc: Descriptor,
        name: str,
        on_read: Callable[[int], None] | None = None,
    ) -> None:
        self._f = fileobj
        self.desc = desc
        self.name = name
        algo = desc.digest.split(":", 1)[0]
        self._hash = hashlib.new(algo)
        self.count = 0
        self._on_read = on_read
        self._done = False

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        data = self._f.read(n if n is not None and n >= 0 else 1 << 20)
        if data:
            self.count += len(data)
            if self.count > self.desc.size:
                raise CorruptDataError(
                    f"{self.name}: more than the declared {self.desc.size} bytes"
                )
            self._hash.update(data)
            if self._on_read is not None:
                self._on_read(len(data))
        elif n != 0:
            self._verify()
        if n is None or n < 0:
            rest = [data]
            while data:
                data = self.read(1 << 20)
                rest.append(data)
            return b"".join(rest)
        return data

    def readinto(self, buf: Any) -> int:
        data = self.read(len(buf))
        buf[: len(data)] = data
        return len(data)

    def drain(self) -> None:
        """Read (and verify) whatever is left, e.g. padding after the tar's end."""
        while self.read(1 << 20):
            pass

    def _verify(self) -> None:
        if self._done:
            return
        self._done = True
        if self.count != self.desc.size:
            raise CorruptDataError(
                f"{self.name}: {self.count} bytes, but the descriptor says {self.desc.size}"
            )
        got = f"{self._hash.name}:{self._hash.hexdigest()}"
        if got != self.desc.digest:
            raise CorruptDataError(f"{self.name}: digest {got} does not match {self.desc.digest}")

    def close(self) -> None:
        self._f.close()

    @property
    def closed(self) -> bool:
        return self._f.closed


# ----------------------------------------------------------------------------- layouts


def parse_layout_ref(ref: str) -> tuple[Path, str | None] | None:
    """(dir, tag) for `oci:DIR[:TAG]`, None if `ref` is not an OCI layout reference."""
    if not ref.startswith("oci:"):
        return None
    rest = ref[4:]
    if not rest:
        raise FormatError("oci: reference without a directory")
    head, sep, tail = rest.rpartition(":")
    if sep and head and "/" not in tail and tail:
        return Path(head), tail
    return Path(rest), None


@dataclass
class SourceImage:
    """A resolved image: its manifest, config and layers, and a way to read blobs."""

    name: str
    manifest_desc: Descriptor
    manifest_bytes: bytes
    config_desc: Descriptor
    config_bytes: bytes
    layers: list[Descriptor]
    open_blob: Callable[[Descriptor], BinaryIO]
    start_prefetch: Callable[[], None] | None = None  # fetch blobs ahead of open_blob
    close: Callable[[], None] | None = None  # stop background work

    @property
    def config(self) -> dict[str, Any]:
        doc = parse_json(self.config_bytes, f"{self.name} config")
        if not isinstance(doc, dict):
            raise FormatError(f"{self.name}: image config is not an object")
        return doc

    def diff_ids(self) -> list[str]:
        """The config's rootfs.diff_ids, one per layer (checked)."""
        rootfs = self.config.get("rootfs") or {}
        ids = rootfs.get("diff_ids") if isinstance(rootfs, dict) else None
        if not isinstance(ids, list) or len(ids) != len(self.layers):
            raise FormatError(
                f"{self.name}: config lists {len(ids) if isinstance(ids, list) else 'no'} "
                f"diff_ids for {len(self.layers)} layers"
            )
        return [check_digest(d, f"{self.name} diff_id") for d in ids]


class OciLayout:
    """An OCI image layout directory (image-spec image-layout.md)."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)

    def blob_path(self, digest: str) -> Path:
        algo, hexd = check_digest(digest).split(":", 1)
        return self.root / "blobs" / algo / hexd

    def read_small(self, desc: Descriptor, limit: int, what: str) -> bytes:
        """A whole small blob (manifest, config), bounded and verified."""
        if desc.size > limit:
            raise FormatError(
                f"{self.root}: {what} {desc.digest} is {desc.size} bytes (limit {limit})"
            )
        path = self.blob_path(desc.digest)
        try:
            with open(path, "rb") as f:
                data = f.read(desc.size + 1)
        except FileNotFoundError:
            raise FormatError(f"{self.root}: {what} blob {desc.digest} is missing") from None
        if len(data) != desc.size or digest_of_any(data, desc.digest) != desc.digest:
            raise CorruptDataError(f"{self.root}: {what} blob {desc.digest} fails its digest")
        return data

    def open_blob(self, desc: Descriptor) -> BinaryIO:
        """A verifying stream over a blob."""
        path = self.blob_path(desc.digest)
        try:
            f = open(path, "rb")  # noqa: SIM115 - DigestReader owns and closes it
        except FileNotFoundError:
            raise FormatError(f"{self.root}: blob {desc.digest} is missing") from None
        return DigestReader(f, desc, f"{self.root}: blob {desc.digest}")  # type: ignore[return-value]

    def index_bytes(self) -> bytes:
        path = self.root / "index.json"
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            raise FormatError(f"{self.root}: not an OCI image layout (no index.json)") from None
        if size > MAX_MANIFEST_BYTES:
            raise FormatError(f"{path}: {size} bytes is too large for an index")
        return path.read_bytes()

    def resolve(self, tag: str | None, *, platform: Platform | None = None) -> SourceImage:
        """The image tagged `tag` (or the only one), platform-selected through nested indexes."""
        where = f"{self.root}/index.json"
        desc = select_from_index(self.index_bytes(), where, platform=platform, tag=tag)
        for _depth in range(4):  # index → (nested index →) manifest
            if desc.media_type in INDEX_TYPES:
                data = self.read_small(desc, MAX_MANIFEST_BYTES, "index")
                desc = select_from_index(
                    data, f"{self.root}: index {desc.digest}", platform=platform, tag=None
                )
                continue
            break
        else:
            raise FormatError(f"{self.root}: indexes nested too deeply")
        manifest = self.read_small(desc, MAX_MANIFEST_BYTES, "manifest")
        config_desc, layers = parse_manifest(manifest, f"{self.root}: manifest {desc.digest}")
        config = self.read_small(config_desc, MAX_CONFIG_BYTES, "config")
        return SourceImage(
            name=f"oci:{self.root}" + (f":{tag}" if tag else ""),
            manifest_desc=desc,
            manifest_bytes=manifest,
            config_desc=config_desc,
            config_bytes=config,
            layers=layers,
            open_blob=self.open_blob,
        )

    # -- writing

    def init(self) -> None:
        """Create the layout skeleton if it is not there yet."""
        (self.root / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
        marker = self.root / "oci-layout"
        if not marker.exists():
            _atomic_write(marker, b'{"imageLayoutVersion":"1.0.0"}')
        if not (self.root / "index.json").exists():
            _atomic_write(self.root / "index.json", _index_doc([]))

    def put_bytes(self, data: bytes, media_type: str) -> Descriptor:
        desc = Descriptor(media_type, digest_of(data), len(data))
        path = self.blob_path(desc.digest)
        if not path.exists():
            _atomic_write(path, data)
        return desc

    def put_file(self, src: str | os.PathLike[str], desc: Descriptor) -> None:
        """Store a local file whose digest is already known (hard link when possible)."""
        path = self.blob_path(desc.digest)
        if path.exists() and path.stat().st_size == desc.size:
            return
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)
        os.replace(tmp, path)

    def tag(self, manifest: Descriptor, tag: str | None) -> None:
        """Point `tag` (or, without one, an untagged entry) at `manifest` in index.json."""
        doc = parse_json(self.index_bytes(), f"{self.root}/index.json")
        entries = doc.get("manifests", []) if isinstance(doc, dict) else []
        desc = Descriptor(manifest.media_type, manifest.digest, manifest.size)
        if tag:
            desc.annotations[REF_NAME] = tag
            entries = [e for e in entries if (e.get("annotations") or {}).get(REF_NAME) != tag]
        else:
            entries = [e for e in entries if e.get("digest") != manifest.digest]
        entries.append(desc.to_json())
        _atomic_write(self.root / "index.json", _index_doc(entries))


def digest_of_any(data: bytes, like: str) -> str:
    algo = like.split(":", 1)[0]
    return f"{algo}:{hashlib.new(algo, data).hexdigest()}"


def _index_doc(manifests: list[dict[str, Any]]) -> bytes:
    return json.dumps(
        {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests}, indent=2
    ).encode()


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(path) as f:
        f.write(data)
