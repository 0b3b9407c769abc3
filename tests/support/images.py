"""Build real overlaybd layer files for tests (through the layers package and its CLI)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from obdfuse.layers.writable import WritableLayer


def make_layer(workdir: Path, name: str, vsize: int, writes: list[tuple[int, bytes]], *,
               zfile: bool = True, tar: bool = True) -> Path:
    """Write `writes` into a fresh writable layer of `vsize` and commit it (-z -t)."""
    workdir.mkdir(parents=True, exist_ok=True)
    data, index = workdir / f"{name}.data", workdir / f"{name}.index"
    layer = WritableLayer.create(data, index, vsize)
    try:
        for offset, payload in writes:
            layer.write(offset, payload)
        layer.flush()
    finally:
        layer.close()
    out = workdir / f"{name}.commit"
    args = [sys.executable, "-m", "obdfuse", "layer", "commit", str(data), str(index), str(out)]
    args += ["-z"] if zfile else []
    args += ["-t"] if tar else []
    subprocess.run(args, check=True, capture_output=True, timeout=300)
    data.unlink()
    index.unlink()
    return out


def random_writes(vsize: int, piece: int = 4 << 20, seed: int = 0) -> list[tuple[int, bytes]]:
    """Incompressible content over the whole virtual size."""
    del seed
    return [(off, os.urandom(min(piece, vsize - off))) for off in range(0, vsize, piece)]
