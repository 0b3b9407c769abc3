"""The merged Stack against a bytearray model: writes, discards, commits, 1–8 layers (§3.8)."""

from __future__ import annotations

import random
import tempfile
from pathlib import Path

import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from obdfuse.blob import FileBlob
from obdfuse.device import BlockDevice
from obdfuse.errors import CorruptDataError
from obdfuse.layers.commit import CommitOptions, commit_layer
from obdfuse.layers.sealed import open_layer
from obdfuse.layers.segment import decode
from obdfuse.layers.stack import Stack
from obdfuse.layers.writable import WritableLayer
from tests.support.layers import apply_ops, commit_to, random_ops

SIZE = 1 << 20

COMMIT_KINDS = ["plain", "lz4", "zstd", "lz4+tar", "plain+tar"]


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
        algorithm, _, tar = kind.partition("+")
        options = {
            "zfile": algorithm != "plain",
            "algorithm": "lz4" if algorithm == "plain" else algorithm,
            "tar": bool(tar),
        }
        layer = await commit_to(rw, tmp / f"l{i}", **options)
        assert layer.wrapping == [w for w in ("tar", "zfile") if options[w]]
        lowers.append(layer)
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


class SlowBlob:
    """A Blob wrapper that records how many reads are in flight at once."""

    def __init__(self, inner, stats: dict) -> None:
        self.inner, self.name, self.stats = inner, inner.name, stats

    @property
    def size(self) -> int:
        return self.inner.size

    async def pread(self, offset: int, length: int) -> bytes:
        self.stats["now"] += 1
        self.stats["max"] = max(self.stats["max"], self.stats["now"])
        await trio.sleep(0.01)
        self.stats["now"] -= 1
        return await self.inner.pread(offset, length)

    async def aclose(self) -> None:
        await self.inner.aclose()


@pytest.mark.parametrize("parallel", [False, True])
def test_parallel_reads_fetch_runs_of_several_layers_at_once(tmp_path, parallel):
    async def go():
        stack, model = await build_stack(tmp_path, [31, 32, 33], ["plain"] * 3)
        stats = {"now": 0, "max": 0}
        for layer in stack.lowers:
            layer.blob = SlowBlob(layer.blob, stats)
        stack.parallel_reads = parallel
        assert await stack.pread(0, SIZE) == model
        assert (stats["max"] > 1) == parallel
        await stack.aclose()

    trio.run(go)


def test_contiguous_segments_are_read_with_one_blob_read(tmp_path):
    """A read over several index entries that are contiguous in one layer is one pread."""

    async def go():
        rw = WritableLayer.create(tmp_path / "d", tmp_path / "i", 64 << 20)
        payload = random.Random(4).randbytes(20 << 20)
        rw.write(0, payload)
        layer = await commit_to(rw, tmp_path / "l")
        rw.close()
        assert len(layer.segments) >= 3  # entries are at most 16382 sectors
        calls = []
        inner_pread = layer.blob.pread

        async def counting_pread(offset, length):
            calls.append((offset, length))
            return await inner_pread(offset, length)

        layer.blob.pread = counting_pread
        stack = Stack([layer])
        assert await stack.pread(1000, 19 << 20) == payload[1000 : 1000 + (19 << 20)]
        assert len(calls) == 1
        await stack.aclose()

    trio.run(go)


def test_concurrent_unaligned_and_aligned_writes_lose_nothing(tmp_path):
    """Read-modify-write must not overwrite a write that lands while it awaits its read."""

    async def go():
        base = WritableLayer.create(tmp_path / "bd", tmp_path / "bi", SIZE)
        base.write(0, b"o" * 4096)
        lower = await commit_to(base, tmp_path / "l")
        base.close()
        lower.blob = SlowBlob(lower.blob, {"now": 0, "max": 0})  # RMW reads yield
        rw = WritableLayer.create(tmp_path / "ud", tmp_path / "ui", SIZE)
        stack = Stack([lower], rw)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(stack.pwrite, 100, b"a" * 10)  # unaligned: RMW of sector 0
            await trio.testing.wait_all_tasks_blocked()  # ... now waiting for its read
            await stack.pwrite(0, b"b" * 512)  # aligned write to the same sector
        got = await stack.pread(0, 512)
        # The aligned write came second: it must not be undone by the stale RMW.
        assert got == b"b" * 512
        await stack.aclose()

    trio.run(go)


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.integers(0, 2**32), min_size=1, max_size=4))
def test_sparse_uppers_over_lowers_after_reopen(seeds):
    """Sparse layers: writes land in place; after reopen a discarded range is simply
    unmapped and shows the layers below (overlaybd's behaviour, §3.7)."""
    block = 4096

    async def go(tmp: Path):
        model = bytearray(SIZE)
        lowers = []
        for i, seed in enumerate(seeds):
            rng = random.Random(seed)
            rw = WritableLayer.create(tmp / f"d{i}", tmp / f"i{i}", SIZE, sparse=True)
            mine = bytearray(SIZE)
            mapped = bytearray(SIZE // block)
            for _ in range(rng.randint(1, 30)):
                first = rng.randrange(SIZE // block)
                n = rng.randint(1, min(16, SIZE // block - first))
                off, length = first * block, n * block
                if rng.random() < 0.3:
                    rw.discard(off, length)
                    mapped[first : first + n] = bytes(n)
                else:
                    data = rng.randbytes(length)
                    rw.write(off, data)
                    mine[off : off + length] = data
                    mapped[first : first + n] = b"\1" * n
            rw.close()
            for k, m in enumerate(mapped):
                if m:
                    model[k * block : (k + 1) * block] = mine[k * block : (k + 1) * block]
            reopened = WritableLayer.open(tmp / f"d{i}", tmp / f"i{i}")
            live = Stack(lowers, reopened)
            assert await live.pread(0, SIZE) == model
            lowers.append(await commit_to(reopened, tmp / f"l{i}"))
            reopened.close()
        stack = Stack(lowers)
        assert await stack.pread(0, SIZE) == model
        await stack.aclose()

    with tempfile.TemporaryDirectory() as tmp:
        trio.run(go, Path(tmp))


@pytest.mark.parametrize("span", ["one_run", "several_runs"])
def test_a_short_layer_read_is_an_error_not_shifted_bytes(tmp_path, span):
    """A source read returning fewer bytes than asked must raise, never return short or
    shifted data (one-run fast path and the multi-run buffer alike)."""

    async def go():
        stack, _ = await build_stack(tmp_path, [41, 42], ["plain"] * 2)
        for layer in stack.lowers:
            inner = layer.read_sectors

            async def short(moffset, count, inner=inner):
                return (await inner(moffset, count))[:-1]

            layer.read_sectors = short
        runs = stack._lookup(0, SIZE // 512)
        if span == "one_run":
            start, count, _, _ = runs[0]
            offset, length = start * 512, count * 512
        else:
            offset, length = 0, SIZE
            assert len(runs) > 1
        with pytest.raises(CorruptDataError, match="returned"):
            await stack.pread(offset, length)
        await stack.aclose()

    trio.run(go)


def test_aclose_closes_every_layer_even_when_one_is_cancelled(tmp_path):
    """A BaseException (trio.Cancelled) from one lower's close must not skip the other
    lowers or the upper (fd leak)."""

    async def go():
        stack, _ = await build_stack(tmp_path, [51, 52, 53], ["plain"] * 3)
        upper = WritableLayer.create(tmp_path / "ud", tmp_path / "ui", SIZE)
        stack = Stack(stack.lowers, upper)
        closed = []
        for i, layer in enumerate(stack.lowers):
            inner = layer.aclose

            async def aclose(i=i, inner=inner):
                closed.append(i)
                await inner()
                if i == 0:
                    raise KeyboardInterrupt  # stands for trio.Cancelled: a BaseException

            layer.aclose = aclose
        with pytest.raises(KeyboardInterrupt):
            await stack.aclose()
        assert closed == [0, 1, 2]
        with pytest.raises(OSError):  # the upper's data fd is closed
            upper.read_sectors_sync(0, 1)

    trio.run(go)
