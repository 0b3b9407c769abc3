"""Benchmark the layered block map: lookups over merged indexes, and stacked reads.

Prints (1) lookup rate of the Stack's read-path lookup over merged indexes of
1K/100K/1M segments spread over 1/4/16 layers, against a per-layer bisect walk
(what a lookup costs without the merged index), and (2) sequential read MB/s of
a stacked local image against reading the equivalent raw file, both from the
page cache, in the same run. Run: .venv/bin/python scripts/bench/layers.py
"""

from __future__ import annotations

import argparse
import bisect
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from obdfuse.blob import FileBlob
from obdfuse.layers.commit import CommitOptions, commit_layer
from obdfuse.layers.dump import dump_image
from obdfuse.layers.index import SegmentIndex
from obdfuse.layers.sealed import SealedLayer, open_layer
from obdfuse.layers.segment import make_segments
from obdfuse.layers.stack import Stack
from obdfuse.layers.writable import WritableLayer

MIB = 1 << 20


def synthetic_layer(rng: np.random.Generator, n: int, space: int) -> SegmentIndex:
    """n random non-overlapping segments (1..64 sectors) in [0, space) sectors."""
    starts = np.sort(rng.choice(space // 64, size=n, replace=False)) * 64
    lengths = rng.integers(1, 65, size=n)
    return SegmentIndex(make_segments(starts, lengths, starts + 8))


class _FakeLayer:
    """Just enough of a SealedLayer for building a Stack's merged index."""

    def __init__(self, index: SegmentIndex, vsize: int) -> None:
        self.index = index
        self.segments = index.segs
        self.virtual_size = vsize


def bench_lookups(total: int, layers: int, probes: int) -> tuple[float, float, float]:
    rng = np.random.default_rng(total + layers)
    space = max(total * 256, 1 << 20)  # sparse enough to keep segments apart
    per = total // layers
    idxs = [synthetic_layer(rng, per, space) for _ in range(layers)]
    t0 = time.perf_counter()
    stack = Stack([_FakeLayer(i, space * 512) for i in idxs])  # type: ignore[list-item]
    merge_s = time.perf_counter() - t0
    starts = rng.integers(0, space - 256, size=probes).tolist()
    lookup = stack._lookup
    t0 = time.perf_counter()
    for s in starts:
        lookup(s, s + 256)  # a 128 KiB read
    merged_rate = probes / (time.perf_counter() - t0)
    # Baseline: walk the layers top-first with bisect, filling gaps (no merged index).
    per_layer = [(i.segs.offset.tolist(), i.end.tolist()) for i in reversed(idxs)]
    t0 = time.perf_counter()
    for s in starts:
        gaps = [(s, s + 256)]
        for offs, ends in per_layer:
            nxt = []
            for g0, g1 in gaps:
                k = bisect.bisect_right(ends, g0)
                pos = g0
                while k < len(offs) and offs[k] < g1:
                    if offs[k] > pos:
                        nxt.append((pos, offs[k]))
                    pos = min(ends[k], g1)
                    k += 1
                if pos < g1:
                    nxt.append((pos, g1))
            gaps = nxt
            if not gaps:
                break
    walk_rate = probes / (time.perf_counter() - t0)
    return merge_s, merged_rate, walk_rate


async def build_image(tmp: Path, size: int, layers: int) -> list[Path]:
    rng = random.Random(1)
    paths = []
    for i in range(layers):
        rw = WritableLayer.create(tmp / f"d{i}", tmp / f"i{i}", size)
        # Each layer rewrites a random quarter of the disk in 64 KiB..1 MiB pieces.
        written = 0
        while written < size // 4:
            n = rng.choice([64 * 1024, 256 * 1024, MIB])
            off = rng.randrange(0, size - n, 4096)
            rw.write(off, os.urandom(n))
            written += n
        if i == 0:
            rw.write(0, os.urandom(size))  # bottom layer: the whole disk
        await commit_layer(rw, tmp / f"l{i}", CommitOptions())
        rw.close()
        paths.append(tmp / f"l{i}")
    return paths


async def bench_reads(tmp: Path, size: int, layers: int, chunk: int) -> tuple[float, float]:
    paths = await build_image(tmp, size, layers)
    lowers: list[SealedLayer] = [await open_layer(FileBlob(p)) for p in paths]
    stack = Stack(lowers)
    raw = tmp / "raw.img"
    await dump_image(stack, raw)
    fd = os.open(raw, os.O_RDONLY)
    for _ in range(2):  # warm the page cache for both
        for off in range(0, size, MIB):
            os.pread(fd, MIB, off)
        for p in paths:
            Path(p).read_bytes()
    t0 = time.perf_counter()
    for off in range(0, size, chunk):
        os.pread(fd, chunk, off)
    raw_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for off in range(0, size, chunk):
        await stack.pread(off, chunk)
    stack_s = time.perf_counter() - t0
    os.close(fd)
    await stack.aclose()
    return size / MIB / raw_s, size / MIB / stack_s


async def bench_writes(tmp: Path, count: int) -> tuple[float, float, float]:
    """Random 4 KiB writes/s: raw file pwrite vs Stack with a writable upper; reopen time."""
    size = 1 << 30
    rng = random.Random(2)
    offsets = [rng.randrange(0, size // 4096) * 4096 for _ in range(count)]
    buf = os.urandom(4096)
    fd = os.open(tmp / "raw", os.O_RDWR | os.O_CREAT)
    os.ftruncate(fd, size)
    t0 = time.perf_counter()
    for off in offsets:
        os.pwrite(fd, buf, off)
    raw_rate = count / (time.perf_counter() - t0)
    os.close(fd)
    rw = WritableLayer.create(tmp / "d", tmp / "i", size)
    stack = Stack([], rw)
    t0 = time.perf_counter()
    for off in offsets:
        await stack.pwrite(off, buf)
    stack_rate = count / (time.perf_counter() - t0)
    await stack.aclose()
    t0 = time.perf_counter()
    WritableLayer.open(tmp / "d", tmp / "i").close()
    return raw_rate, stack_rate, time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--probes", type=int, default=20000)
    parser.add_argument("--read-size", type=int, default=256, help="MiB of the read test disk")
    args = parser.parse_args()
    print("lookup of a 128 KiB read, merged index vs per-layer bisect walk")
    print(
        f"{'segments':>9} {'layers':>6} {'merge s':>8} {'lookups/s':>10} "
        f"{'walk/s':>10} {'ratio':>6}"
    )
    for total in (1_000, 100_000, 1_000_000):
        for layers in (1, 4, 16):
            merge_s, merged, walk = bench_lookups(total, layers, args.probes)
            print(
                f"{total:>9} {layers:>6} {merge_s:>8.3f} {merged:>10.0f} {walk:>10.0f} "
                f"{merged / walk:>6.2f}"
            )
    print()
    print(f"sequential read of a {args.read_size} MiB disk (page cache), stack vs raw file")
    print(f"{'layers':>6} {'chunk':>7} {'raw MB/s':>9} {'stack MB/s':>10} {'ratio':>6}")
    for layers in (1, 4):
        for chunk in (128 * 1024, MIB):
            with tempfile.TemporaryDirectory() as tmp:
                raw, stacked = trio.run(bench_reads, Path(tmp), args.read_size * MIB, layers, chunk)
            print(
                f"{layers:>6} {chunk // 1024:>6}K {raw:>9.0f} {stacked:>10.0f} "
                f"{stacked / raw:>6.2f}"
            )
    print()
    count = 50_000
    with tempfile.TemporaryDirectory() as tmp:
        raw_w, stack_w, reopen = trio.run(bench_writes, Path(tmp), count)
    print(f"random 4 KiB writes, page cache, {count} writes")
    print(f"raw file {raw_w:.0f}/s, writable upper {stack_w:.0f}/s, ratio {stack_w / raw_w:.2f}")
    print(f"reopen of the writable upper (log replay of {count} records): {reopen * 1000:.0f} ms")


if __name__ == "__main__":
    main()
