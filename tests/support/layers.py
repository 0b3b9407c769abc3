"""Test helpers for layers: a bytearray model of a disk and layer builders."""

from __future__ import annotations

import random
from pathlib import Path

from obdfuse.blob import FileBlob
from obdfuse.layers.commit import CommitOptions, commit_layer
from obdfuse.layers.sealed import SealedLayer, open_layer
from obdfuse.layers.writable import WritableLayer

SECTOR = 512


def random_ops(rng: random.Random, size: int, count: int) -> list[tuple[str, int, int]]:
    """Random sector-aligned ('w'|'d', offset, length) operations on a disk of `size` bytes."""
    sectors = size // SECTOR
    ops = []
    for _ in range(count):
        start = rng.randrange(sectors)
        n = rng.randint(1, min(sectors - start, rng.choice([1, 8, 64, 300])))
        ops.append(("d" if rng.random() < 0.25 else "w", start * SECTOR, n * SECTOR))
    return ops


def apply_ops(layer: WritableLayer, model: bytearray, ops, rng: random.Random) -> None:
    """Apply ops to the layer and to the model (discards read as zeros)."""
    for kind, offset, length in ops:
        if kind == "w":
            data = rng.randbytes(length)
            layer.write(offset, data)
            model[offset : offset + length] = data
        else:
            layer.discard(offset, length)
            model[offset : offset + length] = bytes(length)


async def commit_to(layer: WritableLayer, out: Path, **options) -> SealedLayer:
    await commit_layer(layer, out, CommitOptions(**options))
    return await open_layer(FileBlob(out))
