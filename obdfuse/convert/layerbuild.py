"""Build one overlaybd layer: a writable layer over the layers so far, filled, committed.

The layer's filesystem is changed the way a container would change it: the
stack (lowers + a new writable upper) is served by an `obdfuse mount` daemon,
its image file is attached to a loop device, and the ext4 inside is mounted and
filled (a tar applied, or mkfs for the base). Everything is then unmounted and
the upper is committed to a tar-wrapped ZFile LSMT layer (spec §4.1, the shape
the reference convertor produces) with the uuid/parent chain of spec §5.2.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import uuid as uuidlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import trio

from obdfuse.convert.progress import Progress
from obdfuse.convert.workspace import Workspace, run_tool

log = logging.getLogger(__name__)

MOUNT_OPTIONS = "noatime"


@dataclass(frozen=True)
class LayerSettings:
    """How layers are committed and what filesystem they hold."""

    algorithm: str = "lz4"
    block_size: int = 4096
    fstype: str = "ext4"
    vsize: int = 64 << 30


@dataclass(frozen=True)
class BuiltLayer:
    """A committed layer file and its identity."""

    path: Path
    digest: str
    size: int
    uuid: str


def chain_uuid(chain_id: str) -> str:
    """The layer uuid the reference convertor derives from a chainID (spec §5.2)."""
    hexd = chain_id.split(":", 1)[1]
    return f"{hexd[0:8]}-{hexd[8:12]}-{hexd[12:16]}-{hexd[16:20]}-{hexd[20:32]}".upper()


def chain_ids(diff_ids: list[str]) -> list[str]:
    """OCI chainIDs: chain[0] = diff[0]; chain[i] = sha256(chain[i-1] + " " + diff[i])."""
    out: list[str] = []
    for diff in diff_ids:
        if not out:
            out.append(diff)
        else:
            out.append("sha256:" + hashlib.sha256(f"{out[-1]} {diff}".encode()).hexdigest())
    return out


def random_uuid() -> str:
    return str(uuidlib.uuid4()).upper()


def file_digest(path: Path) -> tuple[str, int]:
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
            size += len(chunk)
    return "sha256:" + h.hexdigest(), size


def build_layer(
    ws: Workspace,
    name: str,
    lowers: list[Path],
    out: Path,
    *,
    layer_uuid: str,
    parent_uuid: str | None,
    settings: LayerSettings,
    progress: Progress,
    fill: Callable[[Path], None] | None = None,
    mkfs: list[str] | None = None,
) -> BuiltLayer:
    """One new layer over `lowers` (bottom first): mkfs and/or `fill(mounted_root)`."""
    if settings.fstype != "ext4":
        raise NotImplementedError(f"filesystem {settings.fstype!r} is not supported yet")
    work = ws.path / name
    work.mkdir()
    config = work / "config.v1.json"
    config.write_text(json.dumps({"lowers": [{"file": str(p)} for p in lowers]}))
    upper = work / "upper"
    mount_args = ["--upper", str(upper)]
    if not lowers:
        mount_args += ["--size", str(settings.vsize)]
    fuse = work / "fuse"
    clock = _PhaseClock(name)
    image = ws.fuse_mount(config, fuse, *mount_args)
    try:
        device = ws.loop_attach(image)
        clock.lap("mount")
        try:
            if mkfs is not None:
                run_tool(
                    [*mkfs, device],
                    what=f"{mkfs[0]} for {name}",
                    env=dict(os.environ, E2FSPROGS_FAKE_TIME="1600000000"),
                )
                clock.lap("mkfs")
            if fill is not None:
                root = work / "rootfs"
                ws.mount(device, root, fstype=settings.fstype, options=MOUNT_OPTIONS)
                try:
                    fill(root)
                    clock.lap("fill")
                finally:
                    ws.umount(root)
                    clock.lap("unmount filesystem")
        finally:
            ws.loop_detach(image)
    finally:
        ws.fuse_umount(fuse)
        clock.lap("unmount obdfuse")
    commit_upper(
        upper,
        out,
        layer_uuid=layer_uuid,
        parent_uuid=parent_uuid,
        settings=settings,
        progress=progress,
        label=name,
    )
    clock.lap("commit")
    os.chmod(out, 0o644)  # a blob, readable like any other
    digest, size = file_digest(out)
    clock.lap("digest")
    log.info("%s: %s, %d bytes; %s", name, digest, size, clock.summary())
    return BuiltLayer(out, digest, size, layer_uuid)


class _PhaseClock:
    """Wall time per phase of a layer build (logged at INFO)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.last = time.perf_counter()
        self.phases: list[tuple[str, float]] = []

    def lap(self, phase: str) -> None:
        now = time.perf_counter()
        self.phases.append((phase, now - self.last))
        self.last = now

    def summary(self) -> str:
        return ", ".join(f"{p} {t:.2f}s" for p, t in self.phases)


def commit_upper(
    upper: Path,
    out: Path,
    *,
    layer_uuid: str,
    parent_uuid: str | None,
    settings: LayerSettings,
    progress: Progress,
    label: str,
) -> None:
    """Commit the writable layer in `upper` to `out` (tar(ZFile(LSMT)))."""
    from obdfuse.image import UPPER_DATA, UPPER_INDEX
    from obdfuse.layers.commit import CommitOptions, commit_layer
    from obdfuse.layers.writable import WritableLayer

    layer = WritableLayer.open(upper / UPPER_DATA, upper / UPPER_INDEX, read_only=True)
    try:
        options = CommitOptions(
            uuid=layer_uuid,
            parent_uuid=parent_uuid,
            zfile=True,
            algorithm=settings.algorithm,
            block_size=settings.block_size,
            tar=True,
        )
        segments = layer.commit_segments()
        total = int(segments.length[~segments.zeroed].sum()) * 512
        with progress.bar(f"commit {label}", total) as bar:
            source = _CountingSource(layer, bar.update)
            trio.run(commit_layer, source, out, options)
    finally:
        layer.close()


class _CountingSource:
    """A commit source that reports the bytes read from it."""

    def __init__(self, inner, tick: Callable[[int], None]) -> None:
        self._inner = inner
        self._tick = tick
        self.virtual_size = inner.virtual_size
        self.uuid = inner.uuid
        self.parent_uuid = inner.parent_uuid

    def commit_segments(self):
        return self._inner.commit_segments()

    async def read_tagged(self, tag: int, moffset: int, count: int) -> bytes:
        data = await self._inner.read_tagged(tag, moffset, count)
        self._tick(len(data))
        return data
