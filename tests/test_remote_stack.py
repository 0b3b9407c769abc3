"""`open_image` on image references: real layers (tar → ZFile → LSMT) pushed to a real
registry, read lazily through the cache as one Stack."""

from __future__ import annotations

import hashlib

import pytest
import trio

from obdfuse.image import open_image
from obdfuse.registry.push import push_layers
from obdfuse.registry.session import Registry
from obdfuse.remote_image import OPEN_IMAGES, RemoteOptions, remote_stats
from tests.support.images import make_layer, random_writes

MiB = 1 << 20
L1_IMAGE_SHA256 = "252cf2c39aecbcbe30bcae47ebf8fc40c858b862c679dd03163608a994a0ed39"


def push(host, paths, tag="latest"):
    async def main():
        reg = Registry.open(f"{host}/sample:{tag}")
        try:
            return await push_layers(reg, paths)
        finally:
            await reg.aclose()

    return trio.run(main)


async def image_sha256(stack, step=8 * MiB):
    h = hashlib.sha256()
    for off in range(0, stack.size, step):
        h.update(await stack.pread(off, step))
    return h.hexdigest()


def test_sample_image_by_tag_and_digest(registry, samples, tmp_path):
    pushed = push(registry.host, [samples / "layers" / "l1.commit.lz4.zfile"])

    async def main():
        for i, spec in enumerate((f"{registry.host}/sample:latest", pushed.reference)):
            stack = await open_image(spec, cache_dir=tmp_path / f"cache{i}")
            try:
                assert stack.size == 1 << 30
                assert await image_sha256(stack) == L1_IMAGE_SHA256
                (image,) = OPEN_IMAGES
                (layer,) = image.stats()["layers"]
                assert layer["bytes_fetched"] <= layer["size"]
            finally:
                await stack.aclose()
            assert OPEN_IMAGES == []

    trio.run(main)


@pytest.fixture(scope="module")
def big_layer(tmp_path_factory):
    """A 256 MiB image of incompressible data, as a tar(ZFile(LSMT)) layer."""
    return make_layer(tmp_path_factory.mktemp("big"), "big", 256 * MiB,
                      random_writes(256 * MiB))


@pytest.mark.slow
def test_small_read_of_big_image_is_lazy_and_survives_restart(registry, big_layer, tmp_path):
    pushed = push(registry.host, [big_layer])
    options = RemoteOptions(cache_dir=tmp_path / "cache", chunk_size=256 * 1024)

    async def local_bytes():
        stack = await open_image(big_layer)
        try:
            return await stack.pread(100 * MiB + 512, MiB)
        finally:
            await stack.aclose()

    want = trio.run(local_bytes)

    async def read_remote():
        stack = await open_image(pushed.reference, remote=options)
        try:
            assert await stack.pread(100 * MiB + 512, MiB) == want
            return remote_stats()["remote"][0]["layers"][0]
        finally:
            await stack.aclose()

    first = trio.run(read_remote)
    assert first["size"] > 256 * MiB
    print("lazy read stats:", first)
    assert first["bytes_fetched"] <= 4 * MiB, first
    second = trio.run(read_remote)  # a new "daemon" on the same cache dir
    assert second["bytes_fetched"] == 0 and second["requests"] == 0, second


def test_plain_oci_layer_gets_a_clear_error(registry, tmp_path):
    import gzip

    from obdfuse.errors import FormatError

    layer = tmp_path / "layer.tar.gz"
    layer.write_bytes(gzip.compress(b"not an overlaybd layer" * 1000))

    async def main():
        reg = Registry.open(f"{registry.host}/plain:latest")
        try:
            await push_layers(reg, [layer], fs_type=None)
        finally:
            await reg.aclose()
        # strip the overlaybd annotations: a plain OCI image
        from obdfuse.asyncio_bridge import run_in_asyncio
        from obdfuse.registry import manifest as mf

        reg = Registry.open(f"{registry.host}/plain:latest")
        try:
            image = await reg.resolve()
            (desc,) = image.manifest.layers
            plain = mf.Descriptor(mf.OCI_LAYER_TAR + "+gzip", desc.digest, desc.size)
            body = mf.build_manifest(image.manifest.config, [plain], mf.DOCKER_MANIFEST)
            await run_in_asyncio(reg.client.put_manifest, "plain", "latest", body,
                                 mf.DOCKER_MANIFEST)
        finally:
            await reg.aclose()
        with pytest.raises(FormatError, match="not an overlaybd layer"):
            await open_image(f"{registry.host}/plain:latest", cache_dir=tmp_path / "cache")
        assert OPEN_IMAGES == []

    trio.run(main)
