"""The persistent chunk cache: coalescing, sharing, restart, verification, size cap."""

from __future__ import annotations

import os

import pytest
import trio

from obdfuse.blob import BytesBlob
from obdfuse.cache import BlobCache
from obdfuse.cache.blob_cache import RateLimit
from obdfuse.cache.store import BlobFiles
from obdfuse.errors import CorruptDataError, ObdfuseError
from obdfuse.registry.manifest import sha256_digest

MiB = 1 << 20


class RecordingBlob(BytesBlob):
    """A real in-memory Blob that records the ranges asked of it."""

    def __init__(self, data: bytes, delay: float = 0.0) -> None:
        super().__init__(data, "remote")
        self.requests: list[tuple[int, int]] = []
        self.delay = delay
        self.fail: Exception | None = None

    async def pread(self, offset, length):
        self.requests.append((offset, length))
        if self.delay:
            await trio.sleep(self.delay)
        if self.fail:
            raise self.fail
        return await super().pread(offset, length)


@pytest.fixture
def data():
    return os.urandom(20 * MiB + 12345)


def run(fn):
    return trio.run(fn)


def test_reads_coalesce_and_hit(tmp_path, data):
    remote = RecordingBlob(data)
    cache = BlobCache(tmp_path, chunk_size=MiB)
    blob = cache.wrap(remote, sha256_digest(data))

    async def main():
        # 3.5 chunks: one request for chunks 1..4
        want = data[MiB + 10 : 4 * MiB + MiB // 2 + 10]
        assert await blob.pread(MiB + 10, 3 * MiB + MiB // 2) == want
        assert remote.requests == [(MiB, 4 * MiB)]
        # chunks 0 and 5 missing, 1..4 present: two requests, no refetch of the middle
        assert await blob.pread(100, 5 * MiB) == data[100:5 * MiB + 100]
        assert sorted(remote.requests[1:]) == [(0, MiB), (5 * MiB, MiB)]
        assert await blob.pread(2 * MiB, 4096) == data[2 * MiB:2 * MiB + 4096]
        assert len(remote.requests) == 3
        # the tail chunk is short
        assert await blob.pread(len(data) - 5, 100) == data[-5:]
        assert remote.requests[-1] == (20 * MiB, 12345)
        assert blob.stats.cache_hits == 1 and blob.stats.cache_misses == 3

    run(main)
    cache.close()


def test_concurrent_readers_share_one_fetch(tmp_path, data):
    remote = RecordingBlob(data, delay=0.1)
    cache = BlobCache(tmp_path, chunk_size=MiB)
    blob = cache.wrap(remote, sha256_digest(data))
    results = {}

    async def reader(i):
        results[i] = await blob.pread(3 * MiB + i * 1000, 500)

    async def main():
        async with trio.open_nursery() as nursery:
            for i in range(20):
                nursery.start_soon(reader, i)

    run(main)
    assert remote.requests == [(3 * MiB, MiB)]
    assert all(results[i] == data[3 * MiB + i * 1000:3 * MiB + i * 1000 + 500] for i in range(20))
    cache.close()


def test_sequential_reads_trigger_readahead(tmp_path, data):
    remote = RecordingBlob(data)
    cache = BlobCache(tmp_path, chunk_size=MiB)
    blob = cache.wrap(remote, sha256_digest(data))

    async def main():
        for off in range(0, 4 * MiB, MiB // 2):
            await blob.pread(off, MiB // 2)
        await trio.sleep(0.2)  # background readahead completes

    run(main)
    assert blob.stats.readahead_chunks >= 4
    fetched = {i for off, n in remote.requests for i in range(off // MiB, (off + n) // MiB)}
    assert {4, 5, 6} <= fetched
    cache.close()


def test_restart_reuses_cache(tmp_path, data):
    digest = sha256_digest(data)
    remote = RecordingBlob(data)
    cache = BlobCache(tmp_path, chunk_size=MiB)

    async def first():
        blob = cache.wrap(remote, digest)
        await blob.pread(5 * MiB, 2 * MiB)

    run(first)
    cache.close()
    remote2 = RecordingBlob(data)
    cache2 = BlobCache(tmp_path, chunk_size=MiB)
    assert cache2.used == 2 * MiB

    async def second():
        blob = cache2.wrap(remote2, digest)
        assert await blob.pread(5 * MiB, 2 * MiB) == data[5 * MiB:7 * MiB]

    run(second)
    assert remote2.requests == []
    cache2.close()


def test_two_processes_share_a_cache_dir(tmp_path, data, caplog):
    """Each blob belongs to one owner; a blob owned elsewhere is cached privately."""
    digest = sha256_digest(data)
    other = os.urandom(6 * MiB)
    first = BlobCache(tmp_path, chunk_size=MiB)  # flock is per open file: like two processes
    second = BlobCache(tmp_path, chunk_size=MiB)
    a = first.wrap(RecordingBlob(data), digest)
    b = second.wrap(RecordingBlob(data), digest)
    c = second.wrap(RecordingBlob(other), sha256_digest(other))
    assert "caching it privately" in caplog.text
    assert b.files.data_path.parent == second.private_dir
    assert c.files.data_path.parent == second.blob_dir

    async def main():
        assert await a.pread(0, 100) == data[:100]
        assert await b.pread(MiB, 100) == data[MiB:MiB + 100]
        assert await c.pread(0, 100) == other[:100]

    run(main)
    assert a.files.present_indices() == [0]  # the owner's files were not touched by b
    second.close()
    assert not second.private_dir.exists()
    first.close()
    third = BlobCache(tmp_path, chunk_size=MiB)  # owns both now, and finds their chunks
    assert third.used == 2 * MiB
    third.close()


def test_unmarked_chunk_is_never_served(tmp_path, data):
    """Data written without its presence bit (a crash before marking) is refetched."""
    digest = sha256_digest(data)
    (tmp_path / "blobs").mkdir()
    files = BlobFiles(tmp_path / "blobs", digest, len(data), MiB)
    os.pwrite(files.data_fd, b"\xff" * MiB, 2 * MiB)  # garbage, never marked
    files.close()
    remote = RecordingBlob(data)
    cache = BlobCache(tmp_path, chunk_size=MiB)

    async def main():
        blob = cache.wrap(remote, digest)
        assert await blob.pread(2 * MiB, MiB) == data[2 * MiB:3 * MiB]

    run(main)
    assert remote.requests == [(2 * MiB, MiB)]
    cache.close()


def test_changed_chunk_size_discards_old_cache(tmp_path, data):
    digest = sha256_digest(data)
    cache = BlobCache(tmp_path, chunk_size=MiB)

    async def fill():
        await cache.wrap(RecordingBlob(data), digest).pread(0, MiB)

    run(fill)
    cache.close()
    cache2 = BlobCache(tmp_path, chunk_size=2 * MiB)
    assert cache2.used == 0
    cache2.close()


def test_digest_mismatch_drops_cache(tmp_path, data, caplog):
    bad = bytearray(data)
    bad[7 * MiB + 3] ^= 0x40
    remote = RecordingBlob(bytes(bad))
    cache = BlobCache(tmp_path, chunk_size=MiB)
    blob = cache.wrap(remote, sha256_digest(data))

    async def main():
        await blob.pread(0, 10 * MiB)  # unverifiable yet: the blob is not complete
        with pytest.raises(CorruptDataError, match="expected sha256"):
            await blob.pread(10 * MiB, len(data))
        assert cache.used == 0
        assert blob.files.present_indices() == []

    run(main)
    assert blob.stats.verify_failures == 1
    assert "dropped its cache" in caplog.text

    async def after():
        # the blob is now suspect: even a read far from the bad byte is refused
        with pytest.raises(CorruptDataError):
            await blob.pread(0, 100)
        # once the source is repaired, the whole blob verifies and reads work again
        remote._data = memoryview(data)
        assert await blob.pread(0, 100) == data[:100]
        assert blob.files.verified

    run(after)
    cache.close()


def test_small_blob_verified_before_serving(tmp_path):
    good = os.urandom(100_000)
    bad = bytearray(good)
    bad[50_000] ^= 1
    remote = RecordingBlob(bytes(bad))
    cache = BlobCache(tmp_path, chunk_size=64 * 1024)
    blob = cache.wrap(remote, sha256_digest(good))

    async def main():
        with pytest.raises(CorruptDataError):
            await blob.pread(0, 10)

    run(main)
    cache.close()


def test_size_cap_holds_with_lru(tmp_path):
    blobs_data = [os.urandom(8 * MiB) for _ in range(3)]
    cache = BlobCache(tmp_path, chunk_size=MiB, capacity=10 * MiB)
    remotes = [RecordingBlob(d) for d in blobs_data]
    blobs = [cache.wrap(r, sha256_digest(d)) for r, d in zip(remotes, blobs_data, strict=True)]

    async def main():
        for blob, d in zip(blobs, blobs_data, strict=True):
            for off in range(0, 8 * MiB, MiB):
                assert await blob.pread(off, MiB) == d[off:off + MiB]
                assert cache.used <= 10 * MiB
        # the newest are cached, the oldest were evicted (whole files punched)
        assert blobs[2].files.complete
        assert blobs[0].files.present_indices() == []
        before = len(remotes[0].requests)
        assert await blobs[0].pread(0, 100) == blobs_data[0][:100]
        assert len(remotes[0].requests) == before + 1

    run(main)
    disk = sum(os.stat(p).st_blocks * 512 for p in (tmp_path / "blobs").glob("*.data"))
    assert disk <= 10 * MiB + 64 * 1024
    cache.close()


def test_background_fill_completes_and_verifies(tmp_path, data):
    remote = RecordingBlob(data)
    cache = BlobCache(tmp_path, chunk_size=MiB)
    blob = cache.wrap(remote, sha256_digest(data))

    async def main():
        await blob.fill(RateLimit(1 << 30))

    run(main)
    assert blob.files.complete and blob.files.verified
    assert max(n for _, n in remote.requests) <= 4 * MiB
    cache.close()


def test_fetch_error_reaches_every_reader(tmp_path, data):
    remote = RecordingBlob(data, delay=0.05)
    remote.fail = ObdfuseError("registry gone")
    cache = BlobCache(tmp_path, chunk_size=MiB)
    blob = cache.wrap(remote, sha256_digest(data))
    errors = []

    async def reader():
        try:
            await blob.pread(0, 100)
        except ObdfuseError as exc:
            errors.append(str(exc))

    async def main():
        async with trio.open_nursery() as nursery:
            for _ in range(5):
                nursery.start_soon(reader)

    run(main)
    assert errors == ["registry gone"] * 5
    assert len(remote.requests) == 1
    cache.close()


def test_block_lru_serves_hot_blocks_from_memory():
    from obdfuse.cache.memory import BlockCachedBlob, BlockLRU

    data = os.urandom(100_000)
    inner = RecordingBlob(data)
    lru = BlockLRU(max_bytes=64 * 1024)
    blob = BlockCachedBlob(inner, lru)

    async def main():
        assert await blob.pread(5000, 10_000) == data[5000:15000]
        assert inner.requests == [(4096, 12288)]
        assert await blob.pread(6000, 100) == data[6000:6100]
        assert await blob.pread(0, 20_000) == data[:20000]  # blocks 0 and 4 are new
        assert inner.requests[1:] == [(0, 4096), (16384, 4096)]
        assert await blob.pread(99_990, 50) == data[99_990:]
        # bounded: a full scan evicts the oldest blocks
        await blob.pread(0, len(data))
        assert lru.bytes_used <= 64 * 1024

    run(main)
    assert lru.hits >= 4


def test_hostile_blob_size_is_refused_before_allocation(tmp_path):
    class Huge(BytesBlob):
        @property
        def size(self):
            return 1 << 62

    cache = BlobCache(tmp_path)
    with pytest.raises(ObdfuseError, match="beyond the cache"):
        cache.wrap(Huge(b""), "sha256:" + "0" * 64)
    cache.close()
