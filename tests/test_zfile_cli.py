"""`obdfuse zfile ...` run as a real process: round trips, verify, info, error paths."""

from __future__ import annotations

import bisect
import hashlib
import json
import os
import subprocess
import sys
import tarfile

import pytest

from obdfuse.zfile.format import FLAGS_INITIAL_HEADER, FLAGS_OVERWRITTEN_HEADER, decode_slot
from tests.support.zfiles import open_reader

PAYLOAD_SHA = "4291aa1112347be8a62f31c153e51e86701aa99b587f9a72cd4f0ac366def885"


def obdfuse(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "obdfuse", "zfile", *args],
        input=stdin,
        capture_output=True,
        timeout=120,
    )


def _one_line_error(r: subprocess.CompletedProcess[bytes]) -> str:
    assert r.returncode == 1, r
    err = r.stderr.decode()
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("obdfuse: error: ")
    return last


def test_decompress_sample_and_recompress(samples, tmp_path) -> None:
    raw = tmp_path / "raw"
    r = obdfuse("decompress", str(samples / "zfile/lz4_bs4.zfile"), str(raw))
    assert r.returncode == 0, r.stderr
    assert hashlib.sha256(raw.read_bytes()).hexdigest() == PAYLOAD_SHA
    for algorithm, bs in (("zstd", "16K"), ("lz4", "8K")):
        zf = tmp_path / f"out.{algorithm}"
        r = obdfuse("compress", "--algorithm", algorithm, "--block-size", bs, str(raw), str(zf))
        assert r.returncode == 0, r.stderr
        assert decode_slot(zf.read_bytes()[:512]).flags == FLAGS_OVERWRITTEN_HEADER
        r = obdfuse("decompress", str(zf), "-")
        assert hashlib.sha256(r.stdout).hexdigest() == PAYLOAD_SHA


def test_streaming_through_pipes_matches_overlaybd_zfile(samples) -> None:
    payload = obdfuse("decompress", str(samples / "zfile/lz4_bs4.zfile"), "-").stdout
    r = obdfuse("compress", "-", "-", stdin=payload)
    assert r.returncode == 0, r.stderr
    assert decode_slot(r.stdout[:512]).flags == FLAGS_INITIAL_HEADER  # streaming form
    from obdfuse.zfile.codec import block_compressor

    if block_compressor(1).reference:  # system liblz4: byte-identical to the C++ tool
        assert r.stdout == (samples / "zfile/lz4_bs4.zfile").read_bytes()
    back = obdfuse("decompress", "-", "-", stdin=r.stdout)
    assert back.returncode == 0 and back.stdout == payload


def test_tar_output_and_input(tmp_path) -> None:
    src = tmp_path / "src"
    src.write_bytes(b"layer data " * 20000)
    for dst, via_pipe in ((tmp_path / "a.tar", False), (tmp_path / "b.tar", True)):
        if via_pipe:
            r = obdfuse("compress", "--tar", "--no-checksum", "-", "-", stdin=src.read_bytes())
            dst.write_bytes(r.stdout)
        else:
            r = obdfuse("compress", "--tar", "--no-checksum", str(src), str(dst))
        assert r.returncode == 0, r.stderr
        with tarfile.open(dst) as tf:
            assert tf.getnames() == ["overlaybd.commit"]
        back = obdfuse("decompress", str(dst), "-")
        assert back.stdout == src.read_bytes()
        info = json.loads(obdfuse("info", "--json", str(dst)).stdout)
        assert info["tar_payload_offset"] == 1536 and info["checksums"] is False


def test_info(samples) -> None:
    r = obdfuse("info", "--json", str(samples / "layers/ext4_64"))
    info = json.loads(r.stdout)
    assert info["algorithm"] == "lz4" and info["block_size"] == 4096
    assert info["blocks"] == 132_309 and info["original_size"] == 541_937_664
    assert info["described_by"] == "trailer" and info["digest_checked"] is False
    text = obdfuse("info", str(samples / "zfile/zstd_bs16.zfile")).stdout.decode()
    assert "algorithm" in text and "zstd" in text and "16384" in text


def test_verify_good_and_bad(samples, tmp_path) -> None:
    r = obdfuse("verify", str(samples / "zfile/zstd_bs16.zfile"))
    assert r.returncode == 0 and b"all 192 blocks OK" in r.stdout
    data = bytearray((samples / "zfile/lz4_bs4.zfile").read_bytes())
    for offset in (5000, 900_000):
        data[offset] ^= 0x55
    bad = tmp_path / "bad.zfile"
    bad.write_bytes(bytes(data))
    r = obdfuse("verify", str(bad))
    last = _one_line_error(r)
    offsets = list(open_reader(bytes(data)).table.offsets)
    hit = [bisect.bisect_right(offsets, o) - 1 for o in (5000, 900_000)]
    assert f"2 of 768 ZFile blocks are bad: {hit[0]}, {hit[1]}" in last
    lines = r.stderr.decode().splitlines()
    for block in hit:
        line = f"block {block} at offset {offsets[block]}: checksum mismatch"
        assert any(line in ln for ln in lines), lines


def test_decompress_corrupt_file_fails_without_output(samples, tmp_path) -> None:
    data = bytearray((samples / "zfile/lz4_bs4.zfile").read_bytes())
    data[700_000] ^= 1
    bad = tmp_path / "bad.zfile"
    bad.write_bytes(bytes(data))
    out = tmp_path / "out"
    last = _one_line_error(obdfuse("decompress", str(bad), str(out)))
    assert "checksum mismatch" in last and "ZFile block" in last
    assert not out.exists() and list(tmp_path.iterdir()) == [bad]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("info", "{samples}/layers/l1.commit"), "not a ZFile (no ZFile magic at offset 0)"),
        (("verify", "{tmp}/missing"), "No such file or directory"),
        (
            ("compress", "--block-size", "3K", "{samples}/layers/l1.commit", "{tmp}/x"),
            "block size 3072 not supported",
        ),
    ],
)
def test_errors_are_one_line(samples, tmp_path, args, message) -> None:
    argv = [a.format(samples=samples, tmp=tmp_path) for a in args]
    assert message in _one_line_error(obdfuse(*argv))
    assert not (tmp_path / "x").exists()


def test_incompressible_64k_refused(tmp_path) -> None:
    src = tmp_path / "random"
    src.write_bytes(os.urandom(200_000))
    last = _one_line_error(
        obdfuse("compress", "--block-size", "64K", str(src), str(tmp_path / "o"))
    )
    assert "upstream overlaybd cannot read" in last
    assert not (tmp_path / "o").exists()
