"""The base layer: an empty filesystem on a virtual disk, built once and cached.

Like overlaybd's `ext4_64`, every converted image starts from a layer that holds
only a freshly made filesystem on a 64 GiB (by default) disk. obdfuse makes it
itself, through its own writable layer and FUSE mount, with the reference mkfs
options (`-O ^has_journal,sparse_super,flex_bg -G 1`, 4 KiB blocks), and keeps it
in the cache so conversions reuse it — and images built anywhere share its digest:
the filesystem UUID, hash seed, timestamps and layer UUID are derived from the
settings, so the layer is byte-for-byte reproducible.

Differences from the reference mkfs options, on purpose: `nodiscard` (discarding a
fresh, all-zero disk would only add zeroed index entries) and
`assume_storage_prezeroed=1` (a new writable layer reads as zeros, so inode tables
need not be written — and the kernel never lazily zeroes them inside a later layer).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import uuid as uuidlib
from pathlib import Path

from obdfuse.convert.layerbuild import BuiltLayer, LayerSettings, build_layer, file_digest
from obdfuse.convert.progress import Progress
from obdfuse.convert.workspace import Workspace

_NAMESPACE = uuidlib.UUID("1f0c8a52-7d0e-4f55-9a43-5b7e0f1d2c3b")


def base_identity(settings: LayerSettings) -> str:
    """A stable name for the base layer made with these settings."""
    return (
        f"{settings.fstype}-{settings.vsize >> 30}G-{settings.algorithm}"
        f"-{settings.block_size >> 10}k"
    )


def base_uuid(settings: LayerSettings) -> str:
    """The LSMT uuid of the base layer (derived, so the layer is reproducible)."""
    return str(uuidlib.uuid5(_NAMESPACE, "layer:" + base_identity(settings))).upper()


def mkfs_command(settings: LayerSettings) -> list[str]:
    """The mkfs command line (device appended by the caller)."""
    if settings.fstype != "ext4":
        raise NotImplementedError(f"base layer for {settings.fstype!r} is not supported yet")
    fs_uuid = str(uuidlib.uuid5(_NAMESPACE, "fs:" + base_identity(settings)))
    seed = str(uuidlib.uuid5(_NAMESPACE, "hash:" + base_identity(settings)))
    return [
        "mkfs.ext4",
        "-F",
        "-q",
        "-b",
        "4096",
        "-O",
        "^has_journal,sparse_super,flex_bg",
        "-G",
        "1",
        "-E",
        f"nodiscard,assume_storage_prezeroed=1,hash_seed={seed}",
        "-U",
        fs_uuid,
    ]


def default_cache_dir() -> Path:
    """/var/cache/obdfuse (shared with `obdfuse mount`) for root, else the XDG cache."""
    if os.geteuid() == 0:
        return Path("/var/cache/obdfuse")
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "obdfuse"


def ensure_base_layer(
    cache_dir: Path, settings: LayerSettings, *, progress: Progress, work_parent: Path | None = None
) -> BuiltLayer:
    """The cached base layer for `settings`, built first if it is missing.

    Concurrent conversions serialise on a lock file; the layer appears atomically.
    """
    base_dir = cache_dir / "base"
    base_dir.mkdir(parents=True, exist_ok=True)
    path = base_dir / f"{base_identity(settings)}.layer"
    lock_path = base_dir / f".{path.name}.lock"
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not path.exists():
            progress.note(f"building the base layer {path.name} (once)")
            with Workspace(work_parent or base_dir) as ws:
                tmp = ws.path / "base.layer"
                build_layer(
                    ws,
                    "base",
                    [],
                    tmp,
                    layer_uuid=base_uuid(settings),
                    parent_uuid=None,
                    settings=settings,
                    progress=progress,
                    mkfs=mkfs_command(settings),
                )
                os.replace(tmp, path)
        with contextlib.suppress(OSError):
            os.utime(path)  # recently used
    digest, size = file_digest(path)
    return BuiltLayer(path, digest, size, base_uuid(settings))
