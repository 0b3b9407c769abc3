"""The registry client against a real docker-registry: push, resolve, ranges, auth."""

from __future__ import annotations

import hashlib
import json
import os

import pytest
import trio

from obdfuse.asyncio_bridge import run_in_asyncio
from obdfuse.errors import CorruptDataError, FormatError, RemoteError
from obdfuse.registry import manifest as mf
from obdfuse.registry.auth import Credentials, credentials_from_docker_config, parse_challenge
from obdfuse.registry.blob import OutagePolicy
from obdfuse.registry.push import push_layers
from obdfuse.registry.reference import parse_reference
from obdfuse.registry.session import Registry, RegistryOptions


def make_layer(path, size, seed=1):
    data = hashlib.sha256(str(seed).encode()).digest() * (size // 32 + 1)
    data = bytes(b ^ (i & 0xFF) for i, b in enumerate(data[:size]))
    path.write_bytes(data)
    return data


def test_reference_grammar():
    r = parse_reference("127.0.0.1:5000/foo/bar")
    assert (r.host, r.repository, r.tag, r.digest, r.plain_http) == (
        "127.0.0.1:5000", "foo/bar", "latest", None, True)
    d = "sha256:" + "ab" * 32
    r = parse_reference(f"localhost:5000/app:v1@{d}")
    assert (r.tag, r.digest, r.reference, r.plain_http) == ("v1", d, d, True)
    r = parse_reference("ubuntu:22.04")
    assert (r.host, r.repository, r.tag, r.plain_http) == (
        "registry-1.docker.io", "library/ubuntu", "22.04", False)
    assert parse_reference("registry.example.com/x").base_url == "https://registry.example.com"
    assert parse_reference("registry.example.com/x", plain_http=True).base_url.startswith("http:")
    for bad in ("host.io/UPPER", "host:5000/repo@sha256:short", "a//b", ""):
        with pytest.raises(Exception, match=r"reference|digest"):
            parse_reference(bad)


def test_challenge_and_credentials(tmp_path):
    c = parse_challenge('Bearer realm="https://auth.io/token",service="reg",'
                        'scope="repository:a/b:pull,push"')
    assert c.scheme == "bearer"
    assert c.params == {"realm": "https://auth.io/token", "service": "reg",
                        "scope": "repository:a/b:pull,push"}
    assert parse_challenge('Basic realm="x"').scheme == "basic"
    creds = Credentials.parse("alice:pa:ss")
    assert creds.password == "pa:ss" and "pa:ss" not in repr(creds)
    import base64

    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({"auths": {
        "https://127.0.0.1:5000": {"auth": base64.b64encode(b"bob:secret").decode()}}}))
    assert credentials_from_docker_config("127.0.0.1:5000", cfg) == Credentials("bob", "secret")
    assert credentials_from_docker_config("other:1", cfg) is None


def test_manifest_parsing_rejects_hostile_input():
    with pytest.raises(FormatError):
        mf.parse_manifest(b"[]", mf.OCI_MANIFEST)
    with pytest.raises(FormatError):
        mf.parse_manifest(b'{"schemaVersion":2,"config":{"mediaType":"x","digest":"sha256:00",'
                          b'"size":1},"layers":[]}', mf.OCI_MANIFEST)
    with pytest.raises(FormatError):
        mf.parse_manifest(b" " * (mf.MAX_MANIFEST_BYTES + 1), mf.OCI_MANIFEST)
    d = "sha256:" + "0" * 64
    neg = {"schemaVersion": 2, "config": {"mediaType": "x", "digest": d, "size": -1}, "layers": []}
    with pytest.raises(FormatError):
        mf.parse_manifest(json.dumps(neg).encode(), mf.OCI_MANIFEST)
    idx = mf.parse_index(json.dumps({"schemaVersion": 2, "manifests": [
        {"mediaType": mf.OCI_MANIFEST, "digest": d, "size": 1,
         "platform": {"os": "linux", "architecture": "arm64", "variant": "v8"}},
        {"mediaType": mf.OCI_MANIFEST, "digest": "sha256:" + "1" * 64, "size": 1,
         "platform": {"os": "linux", "architecture": "amd64"}},
    ]}).encode(), mf.OCI_INDEX)
    assert mf.select_platform(idx, mf.Platform()).digest.endswith("1" * 64)
    assert mf.select_platform(idx, mf.Platform.parse("linux/arm64")).digest == d
    with pytest.raises(FormatError, match="s390x"):
        mf.select_platform(idx, mf.Platform("linux", "s390x"))


def run(fn, *args):
    return trio.run(fn, *args)


def push(registry_host, tmp_path, layers, tag="latest", opts=None, **kw):
    async def main():
        reg = Registry.open(f"{registry_host}/sample:{tag}", opts)
        try:
            return await push_layers(reg, layers, **kw)
        finally:
            await reg.aclose()

    return run(main)


@pytest.mark.parametrize("oci", [False, True])
def test_push_resolve_and_ranges(registry, tmp_path, oci):
    a = make_layer(tmp_path / "a.layer", 3 << 20, 1)
    b = make_layer(tmp_path / "b.layer", 100_000, 2)
    pushed = push(registry.host, tmp_path, [tmp_path / "a.layer", tmp_path / "b.layer"],
                  oci=oci, chunk_size=1 << 20)  # a goes up chunked, b monolithic

    async def main():
        for spec in (f"{registry.host}/sample:latest", pushed.reference):
            reg = Registry.open(spec)
            try:
                image = await reg.resolve()
                assert image.manifest_digest == pushed.manifest_digest
                assert image.manifest.media_type == (mf.OCI_MANIFEST if oci
                                                     else mf.DOCKER_MANIFEST)
                diff_ids = mf.parse_config_diff_ids(image.config)
                assert diff_ids == [d.digest for d in image.manifest.layers]
                ob = [mf.overlaybd_layer(d) for d in image.manifest.layers]
                assert [o.size for o in ob] == [len(a), len(b)]
                assert all(o.version == "0.1.0" and o.fs_type == "ext4" for o in ob)
                blob_a, blob_b = reg.layer_blobs(image)
                assert await blob_a.pread(12345, 1 << 20) == a[12345:12345 + (1 << 20)]
                assert await blob_b.pread(99_990, 100) == b[99_990:]
                assert await blob_b.pread(200_000, 10) == b""
                assert blob_a.stats.requests == 1
                assert blob_a.stats.bytes_fetched == 1 << 20
            finally:
                await reg.aclose()

    run(main)


def test_push_is_idempotent_and_digest_mismatch_detected(registry, tmp_path):
    make_layer(tmp_path / "a.layer", 10_000)
    p1 = push(registry.host, tmp_path, [tmp_path / "a.layer"])
    p2 = push(registry.host, tmp_path, [tmp_path / "a.layer"])
    assert p1.manifest_digest == p2.manifest_digest
    wrong = "sha256:" + "f" * 64

    async def main():
        reg = Registry.open(f"{registry.host}/sample@{wrong}")
        try:
            with pytest.raises(RemoteError, match="not found"):
                await reg.resolve()
        finally:
            await reg.aclose()

    run(main)


def test_corrupt_config_blob_is_refused(registry, tmp_path):
    make_layer(tmp_path / "a.layer", 10_000)
    push(registry.host, tmp_path, [tmp_path / "a.layer"])

    async def main():
        reg = Registry.open(f"{registry.host}/sample:latest")
        try:
            image = await reg.resolve()
            path = registry.blob_path(image.manifest.config.digest)
            data = bytearray(path.read_bytes())
            data[5] ^= 1
            path.write_bytes(bytes(data))
            with pytest.raises(CorruptDataError, match="digest mismatch"):
                await reg.resolve()
        finally:
            await reg.aclose()

    run(main)


@pytest.fixture
def auth_registry(tmp_path):
    from tests.support.registry import RegistryServer

    with RegistryServer(tmp_path / "authreg", users={"alice": "wonderland"}) as server:
        yield server


def test_basic_auth(auth_registry, tmp_path, caplog):
    make_layer(tmp_path / "a.layer", 50_000)
    with pytest.raises(RemoteError, match="requires credentials"):
        push(auth_registry.host, tmp_path, [tmp_path / "a.layer"])
    with pytest.raises(RemoteError, match="authentication failed"):
        push(auth_registry.host, tmp_path, [tmp_path / "a.layer"],
             opts=RegistryOptions(creds="alice:wrong"))
    caplog.set_level("DEBUG")
    pushed = push(auth_registry.host, tmp_path, [tmp_path / "a.layer"],
                  opts=RegistryOptions(creds="alice:wonderland"))

    async def main():
        reg = Registry.open(pushed.reference, RegistryOptions(creds="alice:wonderland"))
        try:
            image = await reg.resolve()
            (blob,) = reg.layer_blobs(image)
            assert await blob.pread(0, 10) == (tmp_path / "a.layer").read_bytes()[:10]
        finally:
            await reg.aclose()

    run(main)
    assert "wonderland" not in caplog.text


def test_unreachable_registry_fails_within_deadline(tmp_path):
    from tests.support.registry import free_port

    port = free_port()

    async def main():
        reg = Registry.open(f"127.0.0.1:{port}/x:latest",
                            RegistryOptions(policy=OutagePolicy("fail", 1.0)))
        try:
            start = trio.current_time()
            with pytest.raises(RemoteError, match="gave up after 1 s"):
                await reg.resolve()
            assert trio.current_time() - start < 3
        finally:
            await reg.aclose()

    run(main)
    assert os.environ.get("NO_SUCH") is None


def test_image_index_platform_selection(registry, tmp_path):
    make_layer(tmp_path / "amd.layer", 5000, 1)
    make_layer(tmp_path / "arm.layer", 6000, 2)
    amd = push(registry.host, tmp_path, [tmp_path / "amd.layer"], tag="amd")
    arm = push(registry.host, tmp_path, [tmp_path / "arm.layer"], tag="arm")

    async def main():
        reg = Registry.open(f"{registry.host}/sample:multi")
        try:
            entries = []
            for pushed, (arch, variant) in ((amd, ("amd64", None)), (arm, ("arm64", "v8"))):
                body, mt, digest = await run_in_asyncio(reg.client.get_manifest, "sample",
                                                        pushed.manifest_digest)
                platform = {"os": "linux", "architecture": arch}
                if variant:
                    platform["variant"] = variant
                entries.append({"mediaType": mt, "digest": digest, "size": len(body),
                                "platform": platform})
            index = json.dumps({"schemaVersion": 2, "mediaType": mf.DOCKER_MANIFEST_LIST,
                                "manifests": entries}).encode()
            await run_in_asyncio(reg.client.put_manifest, "sample", "multi", index,
                                 mf.DOCKER_MANIFEST_LIST)
        finally:
            await reg.aclose()
        for platform, want in (("linux/amd64", amd), ("linux/arm64", arm)):
            reg = Registry.open(f"{registry.host}/sample:multi",
                                RegistryOptions(platform=mf.Platform.parse(platform)))
            try:
                image = await reg.resolve()
                assert image.manifest_digest == want.manifest_digest
            finally:
                await reg.aclose()
        reg = Registry.open(f"{registry.host}/sample:multi",
                            RegistryOptions(platform=mf.Platform.parse("linux/riscv64")))
        try:
            with pytest.raises(FormatError, match="riscv64"):
                await reg.resolve()
        finally:
            await reg.aclose()

    run(main)


def test_download_blob_streams_and_verifies(registry, tmp_path):
    data = make_layer(tmp_path / "a.layer", 3 << 20, 5)
    pushed = push(registry.host, tmp_path, [tmp_path / "a.layer"])
    (desc,) = pushed.layers

    async def main():
        reg = Registry.open(pushed.reference)
        try:
            out = tmp_path / "down"
            await run_in_asyncio(reg.client.download_blob, "sample", desc.digest, desc.size, out)
            assert out.read_bytes() == data
            path = registry.blob_path(desc.digest)
            raw = bytearray(path.read_bytes())
            raw[100] ^= 1
            path.write_bytes(bytes(raw))
            bad = tmp_path / "bad"
            with pytest.raises(CorruptDataError, match="downloaded content"):
                await run_in_asyncio(reg.client.download_blob, "sample", desc.digest,
                                     desc.size, bad)
            assert not bad.exists() and not (tmp_path / ".bad.part").exists()
        finally:
            await reg.aclose()

    run(main)
