"""`obdfuse layer ...` and `obdfuse dump` end to end, as a user runs them (subprocess)."""

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from obdfuse.layers.writable import WritableLayer
from tests.support.layers import apply_ops, random_ops

L1_IMAGE_SHA256 = "252cf2c39aecbcbe30bcae47ebf8fc40c858b862c679dd03163608a994a0ed39"
MIB = 1 << 20


def obdfuse(*args, ok: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-m", "obdfuse", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=120,
        env={k: v for k, v in os.environ.items() if k != "OBDFUSE_DEBUG"},
    )
    if ok:
        assert proc.returncode == 0, proc.stderr
    return proc


def assert_clean_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    for needle in needles:
        assert needle in proc.stderr, proc.stderr


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(8 * MIB):
            h.update(chunk)
    return h.hexdigest()


def test_dump_l1_commit_gives_the_reference_image(samples, tmp_path):
    out = tmp_path / "disk.img"
    obdfuse("dump", samples / "layers" / "l1.commit", out)
    assert out.stat().st_size == 1 << 30
    assert out.stat().st_blocks * 512 < 4 * MIB  # holes stay holes
    assert sha256_file(out) == L1_IMAGE_SHA256


def test_dump_l1_commit_zfile_gives_the_reference_image(samples, tmp_path):
    out = tmp_path / "disk.img"
    obdfuse("dump", samples / "layers" / "l1.commit.lz4.zfile", out)
    assert sha256_file(out) == L1_IMAGE_SHA256


@pytest.mark.slow
def test_dump_ext4_64_is_a_sparse_disk_that_fscks(samples, tmp_path):
    out = tmp_path / "disk.img"
    obdfuse("dump", samples / "layers" / "ext4_64", out)
    st = out.stat()
    assert st.st_size == 64 << 30
    assert st.st_blocks * 512 < 64 * MIB  # holes stay holes
    fsck = subprocess.run(["e2fsck", "-fn", str(out)], capture_output=True, text=True, timeout=120)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    info = json.loads(obdfuse("layer", "info", "--json", samples / "layers" / "ext4_64").stdout)
    assert info["wrapping"] == "zfile" and info["segments"] == 8323
    assert info["uuid"] == "C02FB491-B4D4-4904-8684-A014D032AF78"


def test_dump_of_a_config_with_relative_and_dir_lowers(samples, tmp_path):
    layer_dir = tmp_path / "layer0"
    layer_dir.mkdir()
    (layer_dir / "overlaybd.commit").symlink_to(samples / "layers" / "l1.commit")
    config = tmp_path / "config.v1.json"
    result = tmp_path / "result"
    config.write_text(json.dumps({"lowers": [{"dir": "layer0"}], "resultFile": "result"}))
    out = tmp_path / "disk.img"
    obdfuse("dump", config, out)
    assert sha256_file(out) == L1_IMAGE_SHA256
    assert result.read_text() == "success"


def test_create_write_commit_info_dump(tmp_path):
    data, index, out = tmp_path / "data", tmp_path / "index", tmp_path / "layer.commit"
    obdfuse(
        "layer",
        "create",
        "--parent-uuid",
        "c02fb491-b4d4-4904-8684-a014d032af78",
        data,
        index,
        "16M",
    )
    info = json.loads(obdfuse("layer", "info", "--json", index).stdout)
    assert info["kind"] == "writable layer index file" and info["virtual_size"] == 16 * MIB
    rng = random.Random(7)
    model = bytearray(16 * MIB)
    rw = WritableLayer.open(data, index)
    apply_ops(rw, model, random_ops(rng, 16 * MIB, 100), rng)
    rw.close()
    obdfuse(
        "layer",
        "commit",
        "-m",
        "first",
        "--uuid",
        "11111111-2222-3333-4444-555555555501",
        data,
        index,
        out,
    )
    info = json.loads(obdfuse("layer", "info", "--json", out).stdout)
    assert info["kind"] == "sealed layer" and info["wrapping"] == "none"
    assert info["uuid"] == "11111111-2222-3333-4444-555555555501"
    assert info["parent_uuid"] == "C02FB491-B4D4-4904-8684-A014D032AF78"
    assert info["user_tag"] == "first" and info["flags"] == "0x6"
    assert info["segments"] > 0 and info["mapped_bytes"] > 0
    text = obdfuse("layer", "info", out).stdout
    assert "mapped_bytes" in text
    obdfuse("dump", out, tmp_path / "disk.img")
    assert (tmp_path / "disk.img").read_bytes() == model
    # The same layer, ZFile-compressed and tar-wrapped, reads back identically.
    for extra, wrapping in [
        (["--zfile"], "zfile"),
        (["--zfile", "--algorithm", "zstd", "--block-size", "16K", "--tar"], "tar+zfile"),
    ]:
        wrapped = tmp_path / f"layer.{wrapping}"
        obdfuse("layer", "commit", *extra, data, index, wrapped)
        info = json.loads(obdfuse("layer", "info", "--json", wrapped).stdout)
        assert info["wrapping"] == wrapping
        assert info["lsmt_size"] == out.stat().st_size
        obdfuse("dump", wrapped, tmp_path / "disk2.img")
        assert (tmp_path / "disk2.img").read_bytes() == model


def test_dump_with_an_upper_directory(samples, tmp_path):
    upper = tmp_path / "upper"
    upper.mkdir()
    WritableLayer.create(upper / "data", upper / "index", 1 << 30).close()
    rw = WritableLayer.open(upper / "data", upper / "index")
    rw.write(0, b"U" * 4096)
    rw.close()
    out = tmp_path / "disk.img"
    obdfuse("dump", "--upper", upper, samples / "layers" / "l1.commit", out)
    with open(out, "rb") as f:
        assert f.read(4096) == b"U" * 4096


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["layer", "create", "{d}", "{i}", "lots"], ["not a size"]),
        (["layer", "create", "{d}", "{i}", "1000"], ["multiple of 512"]),
        (["layer", "create", "--parent-uuid", "nope", "{d}", "{i}", "1M"], ["not a UUID"]),
        (["layer", "commit", "{d}", "{i}", "{o}"], ["does not exist"]),
        (["layer", "commit", "{t}", "{o}"], ["does not exist"]),
        (["layer", "commit", "{o}"], ["expected UPPER_DIR OUT"]),
        (["layer", "info", "{g}"], ["error:", "bad magic"]),
        (
            ["layer", "commit", "--zfile", "--block-size", "3K", "{g}", "{i}", "{o}"],
            ["power of two"],
        ),
        (["dump", "{g}", "{o}"], ["error:", "bad magic"]),
        (["dump", "{t}/missing", "{o}"], ["error:", "not a file"]),
        (["dump", "{c}", "{o}"], ["error:", "lowers[0]"]),
    ],
)
def test_cli_errors_are_one_clean_line(tmp_path, args, needles):
    garbage = tmp_path / "garbage"
    # Not a layer of any kind; starts with a NUL so it can never look like a JSON config.
    garbage.write_bytes(b"\0" + os.urandom(19_999))
    config = tmp_path / "config.v1.json"
    config.write_text(json.dumps({"lowers": [{"file": "nowhere.commit"}]}))
    names = {
        "d": tmp_path / "d",
        "i": tmp_path / "i",
        "o": tmp_path / "o",
        "g": garbage,
        "t": tmp_path,
        "c": config,
    }
    proc = obdfuse(*[a.format(**names) for a in args], ok=False)
    assert_clean_error(proc, *needles)
    assert not (tmp_path / "o").exists()


def test_create_and_commit_refuse_to_overwrite(tmp_path):
    obdfuse("layer", "create", tmp_path / "d", tmp_path / "i", "1M")
    proc = obdfuse("layer", "create", tmp_path / "d", tmp_path / "i", "1M", ok=False)
    assert_clean_error(proc, "File exists")
    out = tmp_path / "out"
    out.write_text("precious")
    proc = obdfuse("layer", "commit", tmp_path / "d", tmp_path / "i", out, ok=False)
    assert_clean_error(proc, "exists", "--force")
    assert out.read_text() == "precious"
    obdfuse("layer", "commit", "--force", tmp_path / "d", tmp_path / "i", out)
    assert out.stat().st_size == 8192


def test_merge_flattens_a_stack(tmp_path):
    """`layer merge` of a two-layer image gives one layer with the same disk."""
    rng = random.Random(9)
    model = bytearray(16 * MIB)
    lowers = []
    for name in ("bottom", "top"):
        data, index = tmp_path / f"{name}.data", tmp_path / f"{name}.index"
        obdfuse("layer", "create", data, index, "16M")
        rw = WritableLayer.open(data, index)
        apply_ops(rw, model, random_ops(rng, 16 * MIB, 60), rng)
        rw.close()
        obdfuse("layer", "commit", data, index, tmp_path / f"{name}.commit")
        lowers.append({"file": f"{name}.commit"})
    config = tmp_path / "config.v1.json"
    config.write_text(json.dumps({"lowers": lowers}))
    obdfuse("layer", "merge", config, tmp_path / "merged")
    info = json.loads(obdfuse("layer", "info", "--json", tmp_path / "merged").stdout)
    assert info["wrapping"] == "zfile"
    assert info["uuid"] == "00000000-0000-0000-0000-000000000000"
    with open(tmp_path / "merged", "rb") as f:
        assert f.read(40)[32] == 0x13  # ZFile header not overwritten, as overlaybd-merge
    obdfuse("dump", tmp_path / "merged", tmp_path / "flat.img")
    assert (tmp_path / "flat.img").read_bytes() == model


def test_a_failed_dump_leaves_the_old_output_and_no_partial_image(samples, tmp_path):
    """A layer whose data is corrupt fails the dump; OUT keeps what it held before."""
    layer = tmp_path / "corrupt.zfile"
    raw = bytearray((samples / "layers" / "l1.commit.lz4.zfile").read_bytes())
    raw[100_000:100_064] = bytes(b ^ 0xFF for b in raw[100_000:100_064])  # inside the blocks
    layer.write_bytes(raw)
    out = tmp_path / "disk.img"
    out.write_bytes(b"previous image")
    proc = obdfuse("dump", layer, out, ok=False)
    assert_clean_error(proc, "corrupt.zfile", "ZFile block")
    assert out.read_bytes() == b"previous image"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corrupt.zfile", "disk.img"]


def test_dump_refuses_a_target_that_is_not_a_regular_file(samples, tmp_path):
    proc = obdfuse("dump", samples / "layers" / "l1.commit", tmp_path, ok=False)
    assert_clean_error(proc)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    proc = obdfuse("dump", samples / "layers" / "l1.commit", fifo, ok=False)
    assert_clean_error(proc, "not a regular file")
