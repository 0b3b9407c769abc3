"""The merged Stack against a bytearray model: writes, discards, commits, 1–8 layers (§3.8)."""

from __future__ import annotations

import random
import tempfile
from pathlib import Path

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from obdfuse.blob import FileBlob
from obdfuse.device import BlockDevice
from obdfuse.layers.commit import CommitOptions, commit_layer
from obdfuse.layers.sealed import open_layer
from obdfuse.layers.segment import decode
from obdfuse.layers.stack import Stack
from obdfuse.layers.writable import WritableLayer
from tests.support.layers import apply_ops, commit_to, random_ops

SIZE = 1 << 20

COMMIT_KINDS = ["plain"]


async def build_stack(tmp: Path, seeds: list[int], kinds: list[str]):
    """Layers made by create → random writes/discards → commit; returns (stack, model)."""
    model = bytearray(SIZE)
    lowers = []
    for i, (seed, kind) in enumerate(zip(seeds, kinds, strict=True)):
        rng = random.Random(seed)
        rw = WritableLayer.create(tmp / f"d{i}", tmp / f"i{i}", SIZE)
        # The writable layer over the lowers so far reads as the model, before commit.
        apply_ops(rw, model, random_ops(rng, SIZE, rng.randint(1, 40)), rng)
        live = Stack(lowers, rw)
        assert await live.pread(0, SIZE) == model
        options = {"zfile": kind != "plain", "algorithm": kind if kind != "plain" else "lz4"}
        lowers.append(await commit_to(rw, tmp / f"l{i}", **options))
        rw.close()
    return Stack(lowers), model


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(st.integers(0, 2**32), min_size=1, max_size=8),
    st.data(),
)
def test_stacked_commits_read_back_as_the_model(seeds, data):
    kinds = [data.draw(st.sampled_from(COMMIT_KINDS)) for _ in seeds]

    async def go(tmp: Path):
        stack, model = await build_stack(tmp, seeds, kinds)
        try:
            assert await stack.pread(0, SIZE) == model
            rng = random.Random(seeds[0])
            for _ in range(20):  # unaligned reads of random ranges
                off = rng.randrange(SIZE)
                n = rng.randint(0, 70_000)
                assert await stack.pread(off, n) == model[off : off + n]
        finally:
            await stack.aclose()

    with tempfile.TemporaryDirectory() as tmp:
        trio.run(go, Path(tmp))


def test_stack_is_a_block_device(tmp_path):
    async def go():
        stack, model = await build_stack(tmp_path, [5], ["plain"])
        assert isinstance(stack, BlockDevice)
        assert stack.read_only and stack.size == SIZE
        with pytest.raises(PermissionError):
            await stack.pwrite(0, bytes(512))
        assert await stack.pread(SIZE - 10, 100) == model[-10:]
        assert await stack.pread(SIZE, 100) == b""
        mapped = stack.flat_index()
        assert stack.allocated_bytes() == mapped.data_sectors() * 512
        await stack.aclose()

    trio.run(go)


def test_writable_stack_unaligned_writes_and_discards(tmp_path):
    async def go():
        lower_stack, model = await build_stack(tmp_path, [11, 12], ["plain", "plain"])
        rw = WritableLayer.create(tmp_path / "ud", tmp_path / "ui", SIZE)
        stack = Stack(lower_stack.lowers, rw)
        assert not stack.read_only
        rng = random.Random(3)
        for _ in range(200):
            off = rng.randrange(SIZE - 1)
            n = rng.randint(1, min(SIZE - off, 9000))
            if rng.random() < 0.3:
                await stack.discard(off, n)
                model[off : off + n] = bytes(n)
            else:
                buf = rng.randbytes(n)
                await stack.pwrite(off, buf)
                model[off : off + n] = buf
        assert await stack.pread(0, SIZE) == model
        with pytest.raises(ValueError):
            await stack.pwrite(SIZE - 10, bytes(20))
        await stack.flush()
        await stack.aclose()
        # Reopen the upper: the same disk.
        lowers = [await open_layer(FileBlob(tmp_path / f"l{i}")) for i in range(2)]
        stack = Stack(lowers, WritableLayer.open(tmp_path / "ud", tmp_path / "ui"))
        assert await stack.pread(0, SIZE) == model
        await stack.aclose()

    trio.run(go)


def test_flattened_stack_commit_equals_the_stack(tmp_path):
    """Committing a whole stack (overlaybd-merge) gives one layer with the same disk."""

    async def go():
        stack, model = await build_stack(tmp_path, [21, 22, 23], ["plain"] * 3)
        await commit_layer(stack, tmp_path / "merged", CommitOptions())
        merged = await open_layer(FileBlob(tmp_path / "merged"))
        assert set(merged.segments.tag.tolist()) == {0}  # readers reset tags to 0
        # On disk each entry carries the level it came from, 0 = top-most layer.
        raw = (tmp_path / "merged").read_bytes()
        ioff, isize = merged.trailer.index_offset, merged.trailer.index_size
        on_disk = decode(raw[ioff : ioff + 16 * isize])
        assert set(on_disk.tag.tolist()) == {0, 1, 2}
        for level, layer in enumerate(reversed(stack.lowers)):
            picked = on_disk.take(on_disk.tag == level)
            for off, n in zip(picked.offset.tolist(), picked.length.tolist(), strict=True):
                i, j = layer.index.find(off, off + n)
                assert j > i  # the data came from that layer
        flat = Stack([merged])
        assert await flat.pread(0, SIZE) == model
        await flat.aclose()
        await stack.aclose()

    trio.run(go)


def test_merged_index_prefers_the_top_layer(tmp_path):
    async def go():
        a = WritableLayer.create(tmp_path / "ad", tmp_path / "ai", SIZE)
        a.write(0, b"A" * 8192)
        b = WritableLayer.create(tmp_path / "bd", tmp_path / "bi", SIZE)
        b.write(4096, b"B" * 512)
        b.discard(6144, 512)
        la = await commit_to(a, tmp_path / "la")
        lb = await commit_to(b, tmp_path / "lb")
        stack = Stack([la, lb])
        got = await stack.pread(0, 8192)
        assert got == b"A" * 4096 + b"B" * 512 + b"A" * 1536 + bytes(512) + b"A" * 1536
        # The top piece comes from layer 1 (top), the rest from layer 0.
        assert sorted(set(stack.merged.segs.tag.tolist())) == [0, 1]
        await stack.aclose()
        a.close()
        b.close()

    trio.run(go)
