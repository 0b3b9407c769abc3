"""Recorder, replay planning and the trace modes, in process over real layers and a real
registry (no FUSE: fast, and every number is exact)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import trio

from obdfuse.errors import FormatError
from obdfuse.image import open_image
from obdfuse.layers.config import load_config
from obdfuse.registry.push import push_layers
from obdfuse.registry.session import Registry
from obdfuse.remote_image import OPEN_IMAGES, RemoteOptions
from obdfuse.trace.format import TraceMode, TraceRecord, encode_trace
from obdfuse.trace.recorder import RecordingBlob, TraceRecorder, record_until_unlocked
from obdfuse.trace.replay import (
    ReplayStats,
    plan_fills,
    read_trace_file,
    records_for_extents,
    replay_records,
    stored_range,
)
from obdfuse.trace.session import TraceSettings
from tests.support.images import make_layer

MiB = 1 << 20
VSIZE = 64 * MiB


@pytest.fixture(scope="module")
def layers(tmp_path_factory):
    """Two tar(ZFile(LSMT)) layers: random data at the bottom, a few patches on top."""
    work = tmp_path_factory.mktemp("layers")
    bottom = make_layer(work, "bottom", VSIZE, [(off, os.urandom(4 * MiB))
                                                for off in range(0, VSIZE, 4 * MiB)])
    top = make_layer(work, "top", VSIZE, [(5 * MiB, os.urandom(MiB)),
                                          (40 * MiB + 4096, os.urandom(8192))])
    return [bottom, top]


def config_for(tmp_path: Path, layers: list[Path], **extra) -> Path:
    path = tmp_path / "config.v1.json"
    path.write_text(json.dumps({"lowers": [{"file": str(p)} for p in layers], **extra}))
    return path


def test_recorder_logs_layer_reads_and_restores_blobs(layers, tmp_path):
    async def main():
        stack = await open_image(config_for(tmp_path, layers))
        try:
            originals = [layer.blob for layer in stack.lowers]
            recorder = TraceRecorder(stack)
            recorder.start()
            assert all(isinstance(layer.blob, RecordingBlob) for layer in stack.lowers)
            data = await stack.pread(5 * MiB - 4096, 8192)  # straddles bottom / top
            big = await stack.pread(10 * MiB, 3 * MiB)  # bottom only, > 1 MiB
            records = recorder.stop()
            await stack.pread(20 * MiB, 4096)  # after stop: not recorded
            assert [layer.blob for layer in stack.lowers] == originals
            # recording never changes what is read
            assert await stack.pread(5 * MiB - 4096, 8192) == data
            assert await stack.pread(10 * MiB, 3 * MiB) == big
            return records, stack.layer_extents(10 * MiB, 3 * MiB)
        finally:
            await stack.aclose()

    records, extents = trio.run(main)
    assert {r.layer for r in records[:2]} == {0, 1}
    assert all(r.count <= MiB for r in records)
    (source, offset, count), = extents
    assert source == 0 and count == 3 * MiB
    tail = [r for r in records if r.layer == 0 and offset <= r.offset < offset + count]
    assert [(r.offset, r.count) for r in tail] == [(offset + i * MiB, MiB) for i in range(3)]
    assert len(records) == 2 + 3


def test_record_lifecycle_writes_on_unlock_and_on_cancel(layers, tmp_path):
    async def main():
        stack = await open_image(layers[0])
        try:
            for name, stop in (("unlocked.trace", "unlock"), ("cancelled.trace", "cancel")):
                path = tmp_path / name
                path.touch()
                recorder = TraceRecorder(stack)
                recorder.start()
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(lambda r=recorder, p=path: record_until_unlocked(
                        r, p, poll=0.02))
                    await trio.sleep(0.05)
                    assert (tmp_path / f"{name}.lock").exists()
                    await stack.pread(MiB, 4096)
                    if stop == "unlock":
                        (tmp_path / f"{name}.lock").unlink()
                    else:
                        nursery.cancel_scope.cancel()
                assert (tmp_path / f"{name}.ok").exists()
                assert not (tmp_path / f"{name}.lock").exists()
                assert not recorder.active
                (rec,) = read_trace_file(path)
                assert rec.layer == 0 and rec.count == 4096
        finally:
            await stack.aclose()

    trio.run(main)


def push(host: str, paths: list[Path]) -> str:
    async def main():
        reg = Registry.open(f"{host}/trace:latest")
        try:
            return (await push_layers(reg, paths)).reference
        finally:
            await reg.aclose()

    return trio.run(main)


def test_replay_coalesces_into_chunk_runs_and_covers_every_record(registry, layers, tmp_path):
    ref = push(registry.host, layers)
    # a "start-up": scattered small reads of both layers, in a deliberately jumbled order
    reads = [(o * MiB + 512 * (o % 7), 4096) for o in (33, 2, 17, 3, 50, 18, 5, 34, 40, 4)]
    reads += [(20 * MiB + i * 300 * 1024, 4096) for i in (2, 0, 3, 1)]  # neighbouring chunks

    async def record() -> list[TraceRecord]:
        stack = await open_image(ref, remote=RemoteOptions(cache_dir=tmp_path / "c0"))
        try:
            recorder = TraceRecorder(stack)
            recorder.start()
            for off, n in reads:
                await stack.pread(off, n)
            return recorder.stop()
        finally:
            await stack.aclose()

    records = trio.run(record)

    async def replay() -> tuple[list, ReplayStats, dict, dict]:
        options = RemoteOptions(cache_dir=tmp_path / "c1", chunk_size=256 * 1024)
        stack = await open_image(ref, remote=options)
        try:
            stats = ReplayStats()
            fills = plan_fills(stack, records, stats, max_request=MiB)
            needed = set()
            for rec in records:
                blob, off, n = stored_range(stack.lowers[rec.layer].blob, rec.offset, rec.count)
                needed |= {(id(blob), c) for c in range(off // blob.chunk_size,
                                                        (off + n - 1) // blob.chunk_size + 1)
                           if not blob.chunk_present(c)}  # (small blobs are read at open)
            assert needed
            planned = {(id(f.target), c) for f in fills
                       for c in range(f.offset // f.target.chunk_size,
                                      -(-(f.offset + f.length) // f.target.chunk_size))}
            assert needed <= planned  # every chunk a record needs is fetched
            assert len(fills) < len(needed)  # neighbouring chunks share a request
            stats = ReplayStats()
            await replay_records(stack, records, stats)
            (image,) = OPEN_IMAGES
            before = [dict(b.stats_dict()) for b in image.blobs]
            for off, n in reads:
                await stack.pread(off, n)
            after = [dict(b.stats_dict()) for b in image.blobs]
            return fills, stats, before, after
        finally:
            await stack.aclose()

    fills, stats, before, after = trio.run(replay)
    assert all(f.cached and f.length <= MiB for f in fills)
    assert [f.order for f in fills] == sorted(f.order for f in fills)
    assert stats.errors == 0 and stats.fills_done == stats.fills
    assert stats.chunks_missing == sum(a["prefetch_chunks"] for a in after)
    for b, a in zip(before, after, strict=True):
        assert a["cache_misses"] == b["cache_misses"]  # the start-up never waited
        assert a["requests"] == b["requests"]


def test_replay_on_local_layers_reads_in_pieces(layers, tmp_path):
    async def main():
        stack = await open_image(config_for(tmp_path, layers))
        try:
            assert stored_range(stack.lowers[0].blob, 0, 4096) is None  # no cache below
            records = records_for_extents(stack, [(4 * MiB, 3 * MiB), (100, 10)])
            stats = ReplayStats()
            fills = plan_fills(stack, records, stats)
            await replay_records(stack, records, ReplayStats())
            return records, fills
        finally:
            await stack.aclose()

    records, fills = trio.run(main)
    assert all(not f.cached and 0 < f.length <= MiB for f in fills)
    # the top layer's 1 MiB patch at 5 MiB splits the extent between the layers
    assert {r.layer for r in records} == {0, 1}
    assert sum(r.count for r in records) == 3 * MiB + 512  # 10 bytes round out to a sector


def test_config_keys(layers, tmp_path):
    accel_dir = tmp_path / "accel"
    accel_dir.mkdir()
    (accel_dir / "trace").write_bytes(encode_trace([TraceRecord(0, 0, 4096)]))
    lowers = [{"file": str(p)} for p in layers] + [{"dir": str(accel_dir)}]
    cfg = tmp_path / "accel.json"
    cfg.write_text(json.dumps({"lowers": lowers, "accelerationLayer": True}))
    settings = TraceSettings.from_config(load_config(cfg))
    assert settings.mode is TraceMode.REPLAY and settings.path == accel_dir / "trace"

    async def layer_count():
        stack = await open_image(cfg)  # the acceleration layer is not a data layer
        try:
            return len(stack.lowers)
        finally:
            await stack.aclose()

    assert trio.run(layer_count) == 2

    rec = config_for(tmp_path, layers, recordTracePath="t.trace")
    assert TraceSettings.from_config(load_config(rec)).mode is TraceMode.DISABLED
    (tmp_path / "t.trace").touch()
    settings = TraceSettings.from_config(load_config(rec))
    assert settings.mode is TraceMode.RECORD and settings.path == tmp_path / "t.trace"
    (tmp_path / "t.trace").write_text("/usr/bin/python3\n")
    assert TraceSettings.from_config(load_config(rec)).mode is TraceMode.PREFETCH_LIST

    both = config_for(tmp_path, layers, recordTracePath="t.trace", accelerationLayer=True)
    with pytest.raises(FormatError, match="cannot be used together"):
        TraceSettings.from_config(load_config(both))
