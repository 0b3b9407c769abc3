"""Layer identity (chainID-derived uuids) and committing a writable layer as the convertor does."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import trio

from obdfuse.blob import FileBlob
from obdfuse.convert.baselayer import base_uuid, mkfs_command
from obdfuse.convert.layerbuild import (
    LayerSettings,
    chain_ids,
    chain_uuid,
    commit_upper,
    file_digest,
)
from obdfuse.convert.progress import Progress
from obdfuse.layers.sealed import open_layer
from obdfuse.layers.writable import WritableLayer

A = "sha256:" + "a" * 64
B = "sha256:" + "b" * 64


def test_chain_ids_follow_the_oci_rule() -> None:
    chains = chain_ids([A, B, A])
    assert chains[0] == A
    assert chains[1] == "sha256:" + hashlib.sha256(f"{A} {B}".encode()).hexdigest()
    assert chains[2] == "sha256:" + hashlib.sha256(f"{chains[1]} {A}".encode()).hexdigest()


def test_chain_uuid_is_the_first_32_hex_digits_uppercased() -> None:
    digest = "sha256:0123456789abcdef0123456789abcdef" + "f" * 32
    assert chain_uuid(digest) == "01234567-89AB-CDEF-0123-456789ABCDEF"


def test_base_layer_identity_is_stable_and_depends_on_settings() -> None:
    s = LayerSettings()
    assert base_uuid(s) == base_uuid(LayerSettings())
    assert base_uuid(s) != base_uuid(LayerSettings(algorithm="zstd"))
    cmd = mkfs_command(s)
    assert cmd[0] == "mkfs.ext4" and "^has_journal,sparse_super,flex_bg" in cmd
    assert "-G" in cmd and cmd[cmd.index("-G") + 1] == "1"


def test_commit_upper_writes_a_tar_wrapped_zfile_layer_with_the_chain(tmp_path: Path) -> None:
    upper = tmp_path / "upper"
    upper.mkdir()
    layer = WritableLayer.create(upper / "data", upper / "index", 1 << 30)
    payload = os.urandom(64 << 10)
    layer.write(1 << 20, payload)
    layer.write(8 << 20, bytes(4096))
    layer.close()
    out = tmp_path / "layer.commit"
    uuid = chain_uuid(chain_ids([A, B])[1])
    commit_upper(
        upper,
        out,
        layer_uuid=uuid,
        parent_uuid=chain_uuid(A),
        settings=LayerSettings(algorithm="zstd", block_size=16384),
        progress=Progress(False),
        label="t",
    )
    assert out.read_bytes()[257:262] == b"ustar"  # tar wrapper outside

    async def check() -> None:
        sealed = await open_layer(FileBlob(out))
        try:
            assert sealed.wrapping == ["tar", "zfile"]
            assert sealed.uuid == uuid
            assert sealed.parent_uuid == chain_uuid(A)
            assert sealed.virtual_size == 1 << 30
            segs = sealed.segments
            first = int(segs.moffset[0])
            assert await sealed.read_sectors(first, 128) == payload
        finally:
            await sealed.aclose()

    trio.run(check)
    digest, size = file_digest(out)
    assert size == out.stat().st_size and digest.startswith("sha256:")
