"""The test registry fixture serves the OCI distribution API and honours Range."""

from __future__ import annotations

import hashlib
import json
import urllib.request


def test_registry_accepts_a_blob_and_serves_ranges(registry) -> None:
    data = bytes(range(256)) * 64
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    req = urllib.request.Request(f"{registry.url}/v2/t/blobs/uploads/", data=b"", method="POST")
    with urllib.request.urlopen(req) as r:
        location = r.headers["Location"]
    sep = "&" if "?" in location else "?"
    put = urllib.request.Request(f"{location}{sep}digest={digest}", data=data, method="PUT")
    put.add_header("Content-Type", "application/octet-stream")
    with urllib.request.urlopen(put) as r:
        assert r.status == 201
    get = urllib.request.Request(f"{registry.url}/v2/t/blobs/{digest}")
    get.add_header("Range", "bytes=100-199")
    with urllib.request.urlopen(get) as r:
        assert r.status == 206
        assert r.read() == data[100:200]
    assert registry.blob_path(digest).read_bytes() == data
    with urllib.request.urlopen(f"{registry.url}/v2/_catalog") as r:
        assert json.load(r)["repositories"] == ["t"]
