"""Trace record/replay end to end: real FUSE mounts, loop devices, ext4, a real registry."""

from __future__ import annotations

import json
import os
import re
import subprocess
import time

import pytest

from obdfuse.trace.format import TraceRecord, encode_trace
from obdfuse.trace.replay import read_trace_file
from tests.support.startup import build_app_image, read_startup

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    return build_app_image(tmp_path_factory.mktemp("app"))


def wait_for(predicate, timeout=30.0, what="condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def layer_stats(mount) -> dict:
    (image,) = mount.stat()["remote"]
    (layer,) = image["layers"]
    return layer


def replay_done(mount) -> dict | None:
    replay = mount.stat()["trace"]["replay"]
    assert replay["state"] not in ("failed", "cancelled"), replay
    return replay if replay["state"] == "done" else None


def test_record_locally_replay_from_registry(mounts, registry, app, tmp_path):
    trace = tmp_path / "startup.trace"
    lock, ok = tmp_path / "startup.trace.lock", tmp_path / "startup.trace.ok"

    # 1. record a start-up on the local layer file
    rec = mounts.mount(app.layer, "--record-trace", str(trace))
    assert trace.exists() and trace.stat().st_size == 0 and lock.exists()
    want = read_startup(mounts, rec.image_path, tmp_path / "root1", app.startup)
    assert rec.stat()["trace"]["recording"] is True
    lock.unlink()  # stop recording (polled each second)
    wait_for(ok.exists, what="the .ok file")
    assert rec.stat()["trace"]["recording"] is False
    records = read_trace_file(trace)
    assert records and {r.layer for r in records} == {0}
    assert all(0 < r.count <= 1 << 20 for r in records)
    assert sum(r.count for r in records) >= want  # every file byte came through the layer
    info = json.loads(mounts.obdfuse("trace", "info", "--json", str(trace)).stdout)
    assert info["format"] == "trace" and info["records"] == len(records)
    assert rec.umount().returncode == 0

    # 2. the same image in a registry, a fresh cache, the trace replayed as prefetch
    ref = f"{registry.host}/app:v1"
    pushed = mounts.obdfuse("push", str(app.layer), ref)
    assert pushed.returncode == 0, pushed.stderr
    remote = mounts.mount(ref, "--cache-dir", str(tmp_path / "cache"), "--replay-trace", str(trace))
    replay = wait_for(lambda: replay_done(remote), timeout=60, what="the replay")
    assert replay["errors"] == 0 and replay["records"] == len(records)
    assert replay["chunks_missing"] > 0 and replay["fills_done"] == replay["fills"]
    before = layer_stats(remote)
    # coalesced: the registry saw at most one request per planned fill (+ the open's reads)
    assert before["requests"] <= replay["fills"] + 4
    assert before["bytes_fetched"] < before["size"]  # still lazy: not the whole blob

    # 3. the start-up again: every read is served from the cache
    assert read_startup(mounts, remote.image_path, tmp_path / "root2", app.startup) == want
    after = layer_stats(remote)
    assert after["cache_misses"] == before["cache_misses"]
    assert after["cache_hits"] > before["cache_hits"]
    assert remote.umount().returncode == 0


def test_cold_start_without_replay_misses(mounts, registry, app, tmp_path):
    """The control: without a trace the same start-up has to fetch on demand."""
    ref = f"{registry.host}/app:v1"
    assert mounts.obdfuse("push", str(app.layer), ref).returncode == 0
    remote = mounts.mount(ref, "--cache-dir", str(tmp_path / "cache"))
    before = layer_stats(remote)
    read_startup(mounts, remote.image_path, tmp_path / "root", app.startup)
    assert layer_stats(remote)["cache_misses"] > before["cache_misses"]


def fiemap_extents(root, names) -> list[tuple[int, int]]:
    """Physical extents (bytes in the image) of files on a loop-mounted ext4, by FIEMAP
    (filefrag): an independent check of the debugfs-based resolution."""
    out = []
    for name in names:
        text = subprocess.run(["filefrag", "-b4096", "-e", str(root / name.lstrip("/"))],
                              capture_output=True, text=True, check=True).stdout
        for m in re.finditer(r"^\s*\d+:\s+\d+\.\.\s*\d+:\s+(\d+)\.\.\s*(\d+):", text, re.M):
            first, last = int(m.group(1)), int(m.group(2))
            out.append((first * 4096, (last - first + 1) * 4096))
    return out


def test_prefetch_list_resolves_real_files(mounts, registry, app, tmp_path):
    ref = f"{registry.host}/app:v1"
    assert mounts.obdfuse("push", str(app.layer), ref).returncode == 0
    plist = tmp_path / "prefetch.list"
    plist.write_text("".join(f"  {name}\n" for name in app.startup) + "/opt/app/etc/\n"
                     "/no/such/file\n")
    info = json.loads(mounts.obdfuse("trace", "info", "--json", str(plist)).stdout)
    assert info["format"] == "prefetch-list" and info["paths"][-2] == "/opt/app/etc/"
    remote = mounts.mount(ref, "--cache-dir", str(tmp_path / "cache"), "--replay-trace", str(plist))
    replay = wait_for(lambda: replay_done(remote), timeout=60, what="the prefetch list")
    assert replay["errors"] == 0 and replay["chunks_missing"] > 0
    etc_files = [n for n in app.files if n.startswith("/opt/app/etc/")]
    device = mounts.loop.attach(remote.image_path, read_only=True)
    root = mounts.loop.mount(device, tmp_path / "root", read_only=True)
    extents = fiemap_extents(root, app.startup + etc_files)
    assert len(extents) >= len(app.startup) + len(etc_files)
    before = layer_stats(remote)
    # read exactly those extents from the served image (no readahead beyond them)
    fd = os.open(remote.image_path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        for offset, length in extents:
            assert len(os.pread(fd, length, offset)) == length
    finally:
        os.close(fd)
    after = layer_stats(remote)
    assert after["cache_hits"] > before["cache_hits"]
    assert after["cache_misses"] == before["cache_misses"]  # every file block was prefetched


def test_bad_trace_fails_replay_but_not_the_mount(mounts, app, tmp_path):
    trace = tmp_path / "bad.trace"
    trace.write_bytes(encode_trace([TraceRecord(0, 0, 4096)])[:-3])
    m = mounts.mount(app.layer, "--replay-trace", str(trace))
    stat = wait_for(lambda: m.stat()["trace"].get("error") and m.stat(), what="the error")
    assert "truncated" in stat["trace"]["error"]
    assert stat["trace"]["replay"]["state"] == "failed"
    with open(m.image_path, "rb") as fh:  # the image is still served
        assert len(fh.read(4096)) == 4096


def test_trace_options_are_checked_before_mounting(mounts, app, tmp_path):
    full = tmp_path / "full.trace"
    full.write_bytes(encode_trace([TraceRecord(0, 0, 512)]))
    res = mounts.obdfuse("mount", str(app.layer), str(tmp_path / "m1"), "--record-trace",
                         str(full))
    assert res.returncode == 1 and "exists and is not empty" in res.stderr
    empty = tmp_path / "empty.trace"
    empty.touch()
    res = mounts.obdfuse("mount", str(app.layer), str(tmp_path / "m2"), "--replay-trace",
                         str(empty))
    assert res.returncode == 1 and "nothing to replay" in res.stderr
    res = mounts.obdfuse("mount", str(app.layer), str(tmp_path / "m3"), "--replay-trace",
                         str(tmp_path / "missing"))
    assert res.returncode == 1 and "no such trace file" in res.stderr


def test_config_keys_drive_the_mount(mounts, app, tmp_path):
    """overlaybd's recordTracePath (record, then replay) and accelerationLayer."""
    trace = tmp_path / "cfg.trace"
    trace.touch()  # empty: record mode
    config = tmp_path / "config.v1.json"
    config.write_text(json.dumps({"lowers": [{"file": str(app.layer)}],
                                  "recordTracePath": str(trace)}))
    rec = mounts.mount(config)
    assert rec.stat()["trace"]["mode"] == "record"
    read_startup(mounts, rec.image_path, tmp_path / "root1", app.startup[:3])
    assert rec.umount().returncode == 0  # closing the image ends the recording
    assert (tmp_path / "cfg.trace.ok").exists() and read_trace_file(trace)

    accel = tmp_path / "accel"
    accel.mkdir()
    (accel / "trace").write_bytes(trace.read_bytes())
    config.write_text(json.dumps({"lowers": [{"file": str(app.layer)}, {"dir": str(accel)}],
                                  "accelerationLayer": True}))
    rep = mounts.mount(config)
    replay = wait_for(lambda: replay_done(rep), what="the acceleration layer's replay")
    assert replay["records"] == len(read_trace_file(trace)) and replay["errors"] == 0
    assert rep.stat()["trace"]["path"] == str(accel / "trace")


def test_unmount_cancels_a_running_replay(mounts, registry, app, tmp_path):
    from tests.support.slowproxy import SlowProxy

    ref = f"{registry.host}/app:v1"
    assert mounts.obdfuse("push", str(app.layer), ref).returncode == 0
    trace = tmp_path / "all.trace"  # the first 64 MiB of the layer: a minute at 8 Mbit/s
    trace.write_bytes(encode_trace([TraceRecord(0, off, 1 << 20)
                                    for off in range(0, 64 << 20, 1 << 20)]))
    with SlowProxy(registry.port, mbit=8, rtt_ms=10) as proxy:
        slow = ref.replace(registry.host, proxy.host)
        m = mounts.mount(slow, "--cache-dir", str(tmp_path / "cache"), "--chunk-size", "256K",
                         "--replay-trace", str(trace))
        wait_for(lambda: m.stat()["trace"]["replay"]["fills_done"] > 0, timeout=60,
                 what="the replay to make progress")
        replay = m.stat()["trace"]["replay"]
        assert replay["state"] == "running" and replay["fills_done"] < replay["fills"]
        start = time.monotonic()
        assert m.umount(timeout=20).returncode == 0
        assert time.monotonic() - start < 10  # the replay is cancelled, not awaited
