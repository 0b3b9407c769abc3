"""A small "application" image for trace tests: an ext4 tree of files as an overlaybd layer."""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from pathlib import Path

from tests.support.images import make_layer
from tests.support.loop import mkfs_ext4

MiB = 1 << 20


@dataclass
class AppImage:
    layer: Path  # tar(ZFile(LSMT)) layer holding an ext4 filesystem
    size: int  # virtual disk size
    files: list[str]  # every regular file (absolute paths inside the fs)
    startup: list[str]  # the files a "start-up" reads


def build_app_image(workdir: Path, *, size: int = 256 * MiB, files: int = 240,
                    seed: int = 7) -> AppImage:
    """Random files (4 KiB to 400 KiB) in a few directories, mkfs.ext4 -d, committed."""
    rng = random.Random(seed)
    tree = workdir / "tree"
    names = []
    for i in range(files):
        rel = f"opt/app/{['lib', 'bin', 'share/data', 'etc'][i % 4]}/f{i:03d}.bin"
        path = tree / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(rng.randbytes(rng.randint(4096, 300 * 1024)))
        names.append("/" + rel)
    raw = workdir / "app.ext4"
    with open(raw, "wb") as fh:
        fh.truncate(size)
    mkfs_ext4(raw, root=tree)
    writes = []
    with open(raw, "rb") as fh:
        for off in range(0, size, MiB):
            piece = fh.read(MiB)
            if piece.count(0) != len(piece):
                writes.append((off, piece))
    layer = make_layer(workdir, "app", size, writes)
    raw.unlink()
    startup = sorted(rng.sample(names, 12))
    return AppImage(layer, size, names, startup)


def read_startup(kit, image_path: Path, root: Path, files: list[str]) -> int:
    """Loop-mount the served image read-only, read `files` whole, unmount; bytes read."""
    device = kit.loop.attach(image_path, read_only=True)
    kit.loop.mount(device, root, read_only=True)
    total = 0
    try:
        for name in files:
            with open(root / name.lstrip("/"), "rb") as fh:
                total += len(fh.read())
    finally:
        kit.loop.umount(root)
        kit.loop.detach(device)
    os.sync()
    return total
