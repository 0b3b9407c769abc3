"""`obdfuse push` and `obdfuse stat` as a user runs them."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import trio

from obdfuse.cli.stat_cmd import summarize
from obdfuse.registry import manifest as mf
from obdfuse.registry.session import Registry

MiB = 1 << 20


def obdfuse(*args, **kw):
    return subprocess.run([sys.executable, "-m", "obdfuse", *args], capture_output=True,
                          text=True, timeout=120, **kw)


def test_push_config_and_read_back(registry, tmp_path):
    (tmp_path / "d").mkdir()
    a = os.urandom(3 * MiB)
    b = os.urandom(MiB + 5)
    (tmp_path / "a.zfile").write_bytes(a)
    (tmp_path / "d" / "overlaybd.commit").write_bytes(b)
    (tmp_path / "config.v1.json").write_text(json.dumps(
        {"lowers": [{"file": "a.zfile"}, {"dir": "d"}]}))
    res = obdfuse("push", str(tmp_path / "config.v1.json"), f"{registry.host}/app:v1",
                  "--oci", "--chunk-size", "1M")
    assert res.returncode == 0, res.stderr
    ref = res.stdout.strip()
    assert ref.startswith(f"{registry.host}/app@sha256:")

    async def main():
        reg = Registry.open(f"{registry.host}/app:v1")
        try:
            image = await reg.resolve()
        finally:
            await reg.aclose()
        return image

    image = trio.run(main)
    assert image.manifest.media_type == mf.OCI_MANIFEST
    assert [d.digest for d in image.manifest.layers] == [
        "sha256:" + hashlib.sha256(x).hexdigest() for x in (a, b)]
    assert mf.parse_config_diff_ids(image.config) == [d.digest for d in image.manifest.layers]
    assert all(mf.overlaybd_layer(d) for d in image.manifest.layers)
    assert ref.endswith(image.manifest_digest)


def test_push_errors_are_one_line(registry, tmp_path):
    res = obdfuse("push", str(tmp_path / "missing.commit"), f"{registry.host}/app:v1")
    assert res.returncode == 1
    assert res.stderr.strip() == f"obdfuse: error: {tmp_path}/missing.commit: no such layer file"
    (tmp_path / "l").write_bytes(b"x")
    res = obdfuse("push", str(tmp_path / "l"), "127.0.0.1:1/app:v1", "--timeout", "1")
    assert res.returncode == 1 and "Traceback" not in res.stderr
    assert res.stderr.startswith("obdfuse: error:")
    assert "gave up after 1 s" in res.stderr


def test_stat_needs_a_mount(tmp_path):
    res = obdfuse("stat", str(tmp_path))
    assert res.returncode == 1
    assert "not an obdfuse mount point" in res.stderr


def test_summarize():
    stats = {"remote": [{"layers": [
        {"size": 100, "bytes_fetched": 10, "requests": 2, "cache_hits": 5, "cache_misses": 2},
        {"size": 300, "bytes_fetched": 30, "requests": 1, "cache_hits": 0, "cache_misses": 1},
    ]}]}
    assert summarize(stats) == {"layers": 2, "image_bytes": 400, "bytes_fetched": 40,
                                "fetched_fraction": 0.1, "requests": 3, "cache_hits": 5,
                                "cache_misses": 3}
