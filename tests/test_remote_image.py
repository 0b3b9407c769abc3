"""Remote images end to end against a real docker-registry: lazy reads through the
persistent cache, restart, bearer tokens, outages, corruption, odd servers."""

from __future__ import annotations

import hashlib
import os
import time

import pytest
import trio

from obdfuse.errors import CorruptDataError, ObdfuseError, RemoteError
from obdfuse.registry.blob import OutagePolicy
from obdfuse.registry.push import push_layers
from obdfuse.registry.session import Registry, RegistryOptions
from obdfuse.remote_image import RemoteOptions, open_remote_image, remote_stats
from tests.support.authproxy import BearerProxy

MiB = 1 << 20


def push_files(host, paths, tag="latest", creds=None):
    async def main():
        reg = Registry.open(f"{host}/sample:{tag}", RegistryOptions(creds=creds))
        try:
            return await push_layers(reg, paths, chunk_size=64 * MiB)
        finally:
            await reg.aclose()

    return trio.run(main)


def write_random(path, size):
    data = os.urandom(size)
    path.write_bytes(data)
    return data


async def read_all(blob, step=4 * MiB):
    h = hashlib.sha256()
    for off in range(0, blob.size, step):
        h.update(await blob.pread(off, step))
    return h.hexdigest()


def opts(tmp_path, **kw):
    reg = RegistryOptions(**{k: kw.pop(k) for k in list(kw) if k in ("creds", "policy")})
    return RemoteOptions(registry=reg, cache_dir=tmp_path / "cache", **kw)


@pytest.mark.slow
def test_lazy_read_and_restart(registry, tmp_path):
    data = write_random(tmp_path / "big.layer", 256 * MiB)
    pushed = push_files(registry.host, [tmp_path / "big.layer"])
    (tmp_path / "big.layer").unlink()

    async def first():
        image = await open_remote_image(f"{registry.host}/sample:latest", opts(tmp_path))
        try:
            (blob,) = image.blobs
            assert await blob.pread(100 * MiB + 5, MiB) == data[100 * MiB + 5:101 * MiB + 5]
            stats = remote_stats()["remote"][0]["layers"][0]
            assert stats["bytes_fetched"] <= 4 * MiB
            assert stats["requests"] == 1
            assert stats["cache_misses"] == 1
            assert image.image.manifest_digest == pushed.manifest_digest
        finally:
            await image.aclose()
        assert remote_stats() == {"remote": []}

    async def second():
        image = await open_remote_image(pushed.reference, opts(tmp_path))
        try:
            (blob,) = image.blobs
            assert await blob.pread(100 * MiB + 5, MiB) == data[100 * MiB + 5:101 * MiB + 5]
            stats = blob.stats_dict()
            assert stats["requests"] == 0 and stats["bytes_fetched"] == 0
            assert stats["cache_hits"] == 1
        finally:
            await image.aclose()

    trio.run(first)
    trio.run(second)


def test_full_image_by_tag_and_digest(registry, tmp_path):
    layers = [write_random(tmp_path / f"l{i}.layer", size)
              for i, size in enumerate((9 * MiB + 4097, 5 * MiB))]
    pushed = push_files(registry.host, [tmp_path / "l0.layer", tmp_path / "l1.layer"])

    async def main():
        for spec in (f"{registry.host}/sample:latest", pushed.reference):
            image = await open_remote_image(spec, opts(tmp_path / spec.replace("/", "_")))
            try:
                got = [await read_all(blob, 3 * MiB + 17) for blob in image.blobs]
                assert got == [hashlib.sha256(d).hexdigest() for d in layers]
                assert all(b.files.verified for b in image.blobs)
            finally:
                await image.aclose()

    trio.run(main)


def test_bearer_token_flow(registry, tmp_path):
    data = write_random(tmp_path / "a.layer", 6 * MiB)
    push_files(registry.host, [tmp_path / "a.layer"])
    with BearerProxy(registry.url, users={"alice": "s3cret"}) as proxy:

        async def main():
            with pytest.raises(RemoteError, match="credentials refused"):
                await open_remote_image(f"{proxy.host}/sample:latest",
                                        opts(tmp_path / "c0", creds="alice:nope"))
            image = await open_remote_image(f"{proxy.host}/sample:latest",
                                            opts(tmp_path / "c1", creds="alice:s3cret"))
            try:
                (blob,) = image.blobs
                tokens_before = proxy.token_requests
                for off in (0, 2 * MiB, 4 * MiB):
                    assert await blob.pread(off, 1000) == data[off:off + 1000]
                assert proxy.token_requests == tokens_before  # token reused
                proxy.revoke_tokens()
                assert await blob.pread(5 * MiB, 1000) == data[5 * MiB:5 * MiB + 1000]
                assert proxy.token_requests == tokens_before + 1  # refreshed after a 401
            finally:
                await image.aclose()

        trio.run(main)


def test_range_ignored_and_redirects(registry, tmp_path, caplog):
    data = write_random(tmp_path / "a.layer", 12 * MiB)
    push_files(registry.host, [tmp_path / "a.layer"])
    with BearerProxy(registry.url) as proxy:

        async def main():
            proxy.ignore_range = True
            image = await open_remote_image(f"{proxy.host}/sample:latest", opts(tmp_path / "a"))
            try:
                (blob,) = image.blobs
                assert await blob.pread(7 * MiB + 3, 100) == data[7 * MiB + 3:7 * MiB + 103]
                # the whole prefix came over the wire, only the range was kept
                assert blob.stats_dict()["bytes_fetched"] == 8 * MiB
                assert blob.files.present_indices() == [7]
                assert "ignores Range requests" in caplog.text
            finally:
                await image.aclose()
            proxy.ignore_range = False
            proxy.redirect_blobs = True
            image = await open_remote_image(f"{proxy.host}/sample:latest", opts(tmp_path / "b"))
            try:
                (blob,) = image.blobs
                assert await blob.pread(3 * MiB, 10) == data[3 * MiB:3 * MiB + 10]
            finally:
                await image.aclose()
            assert any(r[2] is None for r in proxy.requests)

        trio.run(main)


def test_outage_fail_then_wait(registry, tmp_path):
    data = write_random(tmp_path / "a.layer", 16 * MiB)
    push_files(registry.host, [tmp_path / "a.layer"])

    async def fail_mode():
        image = await open_remote_image(
            f"{registry.host}/sample:latest",
            opts(tmp_path / "f", policy=OutagePolicy("fail", 2.0)))
        try:
            (blob,) = image.blobs
            assert await blob.pread(0, 100) == data[:100]
            registry.stop()
            start = time.monotonic()
            with pytest.raises(ObdfuseError, match=r"gave up|timed out"):
                await blob.pread(8 * MiB, 100)
            assert time.monotonic() - start < 6
        finally:
            await image.aclose()

    trio.run(fail_mode)
    registry.restart()

    async def wait_mode():
        image = await open_remote_image(
            f"{registry.host}/sample:latest",
            opts(tmp_path / "w", policy=OutagePolicy("wait", 2.0)))
        try:
            (blob,) = image.blobs
            registry.stop()
            result = {}

            async def reader():
                result["data"] = await blob.pread(9 * MiB, 100)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(reader)
                await trio.sleep(3.0)  # longer than the fail deadline: still waiting
                assert "data" not in result
                await trio.to_thread.run_sync(registry.restart)
            assert result["data"] == data[9 * MiB:9 * MiB + 100]
        finally:
            await image.aclose()

    trio.run(wait_mode)


def test_blob_corrupted_in_registry_storage(registry, tmp_path):
    small = write_random(tmp_path / "small.layer", 2 * MiB)
    big = write_random(tmp_path / "big.layer", 10 * MiB)
    pushed = push_files(registry.host, [tmp_path / "small.layer", tmp_path / "big.layer"])
    for layer in pushed.layers:
        path = registry.blob_path(layer.digest)
        raw = bytearray(path.read_bytes())
        raw[len(raw) // 2] ^= 0x01
        path.write_bytes(bytes(raw))

    async def main():
        image = await open_remote_image(pushed.reference, opts(tmp_path))
        try:
            small_blob, big_blob = image.blobs
            with pytest.raises(CorruptDataError, match="digest"):
                await small_blob.pread(0, 100)  # small blobs are verified before serving
            with pytest.raises(CorruptDataError, match="digest"):
                await read_all(big_blob)
            assert big_blob.files.present_indices() == []
            assert image.cache.used == 0
        finally:
            await image.aclose()

    trio.run(main)
    assert small and big


def test_background_fetch_fills_and_verifies(registry, tmp_path):
    data = write_random(tmp_path / "a.layer", 24 * MiB)
    push_files(registry.host, [tmp_path / "a.layer"])

    async def main():
        image = await open_remote_image(
            f"{registry.host}/sample:latest",
            opts(tmp_path, background_fetch=True, background_rate=64 * MiB))
        try:
            (blob,) = image.blobs
            # demand reads are served correctly while the fill runs
            assert await blob.pread(20 * MiB, 100) == data[20 * MiB:20 * MiB + 100]
            with trio.fail_after(30):
                while not blob.files.verified:
                    await trio.sleep(0.05)
            assert blob.stats.background_bytes >= 20 * MiB
            assert blob.files.complete
        finally:
            await image.aclose()

    trio.run(main)


def test_cache_size_cap_holds_on_real_reads(registry, tmp_path):
    data = write_random(tmp_path / "a.layer", 40 * MiB)
    push_files(registry.host, [tmp_path / "a.layer"])

    async def main():
        image = await open_remote_image(f"{registry.host}/sample:latest",
                                        opts(tmp_path, cache_size=8 * MiB))
        try:
            (blob,) = image.blobs
            for off in range(0, 40 * MiB, 3 * MiB):
                assert await blob.pread(off, MiB) == data[off:off + MiB]
                assert image.cache.used <= 8 * MiB
            disk = sum(p.stat().st_blocks * 512
                       for p in (tmp_path / "cache" / "blobs").glob("*.data"))
            assert disk <= 8 * MiB + 64 * 1024
            # evicted ranges come back from the registry, correctly
            assert await blob.pread(0, 100) == data[:100]
        finally:
            await image.aclose()

    trio.run(main)
