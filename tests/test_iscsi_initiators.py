"""The obdfuse iSCSI target driven by real initiators: libiscsi's tools and qemu."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.support.iscsi import OBDFUSE_IQN, ObdfuseTarget

L1_IMAGE_SHA256 = "252cf2c39aecbcbe30bcae47ebf8fc40c858b862c679dd03163608a994a0ed39"


def run(*cmd: str, timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, errors="replace", timeout=timeout,
                          check=check)


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


@pytest.fixture
def disk(tmp_path) -> Path:
    """A 32 MiB sparse raw disk with random data at a few places."""
    path = tmp_path / "disk.img"
    with open(path, "wb") as f:
        f.truncate(32 << 20)
        for off in (0, 5 << 20, (32 << 20) - 65536):
            f.seek(off)
            f.write(os.urandom(65536))
    return path


@pytest.fixture
def l1_config(tmp_path, samples) -> Path:
    cfg = tmp_path / "config.v1.json"
    cfg.write_text(json.dumps({"lowers": [{"file": str(samples / "layers/l1.commit.lz4.zfile")}]}))
    return cfg


def test_iscsi_ls_inq_readcapacity_see_lun0(disk):
    with ObdfuseTarget("--raw", str(disk)) as t:
        ls = run("iscsi-ls", "-s", f"iscsi://127.0.0.1:{t.port}")
        assert f"Target:{OBDFUSE_IQN} Portal:127.0.0.1:{t.port},1" in ls.stdout
        assert "Lun:0" in ls.stdout and "DIRECT_ACCESS" in ls.stdout
        inq = run("iscsi-inq", t.url)
        assert "Peripheral Device Type:DIRECT_ACCESS" in inq.stdout
        assert "SBC-3" in inq.stdout
        vpd83 = run("iscsi-inq", "-e", "1", "-c", "131", t.url)
        assert "Designator Type:(3) NAA" in vpd83.stdout
        assert "T10_VENDORT_ID" in vpd83.stdout
        serial = run("iscsi-inq", "-e", "1", "-c", "128", t.url)
        assert "Unit Serial Number:[" in serial.stdout
        rc16 = run("iscsi-readcapacity16", t.url)
        assert f"Total size:{32 << 20}" in rc16.stdout
        assert "LOGICAL BLOCK LENGTH IN BYTES:512" in rc16.stdout


def test_qemu_img_convert_raw_file_is_byte_identical(disk, tmp_path):
    out = tmp_path / "copy.raw"
    with ObdfuseTarget("--raw", str(disk)) as t:
        run("qemu-img", "convert", "-O", "raw", t.url, str(out))
    assert sha256(out) == sha256(disk)


def test_qemu_img_convert_overlaybd_image_matches_reference(l1_config, tmp_path):
    """A real image written by the C++ tools (ZFile-compressed LSMT) read over iSCSI."""
    out = tmp_path / "l1.raw"
    with ObdfuseTarget(str(l1_config)) as t:
        info = run("qemu-img", "info", "--output=json", t.url)
        assert json.loads(info.stdout)["virtual-size"] == 1 << 30
        run("qemu-img", "convert", "-O", "raw", t.url, str(out), timeout=120)
    assert sha256(out) == L1_IMAGE_SHA256


def test_read_only_image_rejects_writes(l1_config):
    with ObdfuseTarget(str(l1_config)) as t:
        w = run("qemu-io", "-f", "raw", "-c", "write -P 0x5a 0 4k", t.url, check=False)
        assert w.returncode != 0 or "failed" in (w.stdout + w.stderr).lower()
        # the WP bit in MODE SENSE makes qemu open it read-only, or the write fails
        # with DATA PROTECT; either way the data is unchanged:
        r = run("qemu-io", "-f", "raw", "-r", "-c", "read -P 0x5a 0 4k", t.url, check=False)
        assert "Pattern verification failed" in r.stdout + r.stderr


def test_qemu_io_writes_to_upper_survive_restart(l1_config, tmp_path):
    upper = tmp_path / "upper"
    with ObdfuseTarget("--upper", str(upper), str(l1_config)) as t:
        run("qemu-io", "-f", "raw", "-c", "write -P 0xa5 1M 128k",
            "-c", "write -P 0x3c 700M 4k", "-c", "flush", t.url)
        r = run("qemu-io", "-f", "raw", "-c", "read -P 0xa5 1M 128k",
                "-c", "read -P 0x3c 700M 4k", t.url)
        assert "Pattern verification failed" not in r.stdout + r.stderr
    with ObdfuseTarget("--upper", str(upper), str(l1_config)) as t:
        r = run("qemu-io", "-f", "raw", "-r", "-c", "read -P 0xa5 1M 128k",
                "-c", "read -P 0x3c 700M 4k", "-c", "read -P 0 704M 4k", t.url)
        assert "Pattern verification failed" not in r.stdout + r.stderr, r.stdout


def test_raw_writable_writes_land_in_the_file(disk):
    with ObdfuseTarget("--raw", "--writable", str(disk)) as t:
        run("qemu-io", "-f", "raw", "-c", "write -P 0x77 3M 64k", "-c", "flush", t.url)
    with open(disk, "rb") as f:
        f.seek(3 << 20)
        assert f.read(65536) == b"\x77" * 65536


def test_chap_good_and_bad_credentials(disk):
    with ObdfuseTarget("--raw", str(disk), chap="alice:secret-of-alice") as t:
        good = run("iscsi-inq", t.url_with("alice", "secret-of-alice"), check=False)
        assert good.returncode == 0, good.stderr
        assert "DIRECT_ACCESS" in good.stdout
        for url in (t.url_with("alice", "wrong-secret-xx"),
                    t.url_with("mallory", "secret-of-alice"), t.url):
            bad = run("iscsi-inq", url, check=False)
            assert bad.returncode != 0
            assert "DIRECT_ACCESS" not in bad.stdout
        # the target keeps serving after failed logins
        assert run("iscsi-inq", t.url_with("alice", "secret-of-alice")).returncode == 0


def test_unknown_target_name_is_refused(disk):
    with ObdfuseTarget("--raw", str(disk)) as t:
        bad = run("iscsi-inq", f"iscsi://127.0.0.1:{t.port}/iqn.2024-01.nobody:none/0",
                  check=False)
        assert bad.returncode != 0
        assert "not found" in (bad.stdout + bad.stderr).lower()


def test_serve_exits_cleanly_on_sigterm(disk):
    t = ObdfuseTarget("--raw", str(disk)).start()
    assert t.stop() == 0


def test_corrupt_image_block_is_a_medium_error_not_wrong_bytes(samples, tmp_path):
    bad = tmp_path / "bad.zfile"
    raw = bytearray((samples / "layers/l1.commit.lz4.zfile").read_bytes())
    for off in range(4096, len(raw) // 2, len(raw) // 40):
        raw[off:off + 64] = bytes(b ^ 0x5A for b in raw[off:off + 64])
    bad.write_bytes(raw)
    cfg = tmp_path / "bad.json"
    cfg.write_text(json.dumps({"lowers": [{"file": str(bad)}]}))
    with ObdfuseTarget(str(cfg), log=tmp_path / "target.log") as t:
        r = run("qemu-io", "-f", "raw", "-r", "-c", "read 0 1M", t.url, check=False)
        assert "Input/output error" in r.stdout + r.stderr
        assert "(0x1100)" in r.stderr  # MEDIUM ERROR / UNRECOVERED READ ERROR sense
        out = tmp_path / "copy.raw"
        c = run("qemu-img", "convert", "-O", "raw", t.url, str(out), check=False)
        assert c.returncode != 0
        assert run("iscsi-inq", t.url).returncode == 0  # still serving
    assert "bad.zfile" in (tmp_path / "target.log").read_text()  # logged, naming the layer


def test_mutual_chap_with_libiscsi(disk):
    with ObdfuseTarget("--raw", "--mutual-chap", "tgtuser:target-secret-1", str(disk),
                       chap="alice:secret-of-alice") as t:
        base = t.url_with("alice", "secret-of-alice")
        good = run("iscsi-inq", f"{base}?target_user=tgtuser&target_password=target-secret-1",
                   check=False)
        assert good.returncode == 0 and "DIRECT_ACCESS" in good.stdout, good.stderr
        # the initiator checks the target's proof: a wrong expectation fails the login
        bad = run("iscsi-inq", f"{base}?target_user=tgtuser&target_password=not-the-secret",
                  check=False)
        assert bad.returncode != 0
        # mutual is required by this target: one-way CHAP is refused
        assert run("iscsi-inq", base, check=False).returncode != 0


def test_header_digest_crc32c(disk, tmp_path):
    out = tmp_path / "copy.raw"
    with ObdfuseTarget("--raw", str(disk)) as t:
        url = f"{t.url}?header_digest=crc32c"  # libiscsi then offers only CRC32C
        assert "DIRECT_ACCESS" in run("iscsi-inq", url).stdout
        opts = (f"driver=iscsi,transport=tcp,portal=127.0.0.1:{t.port},target={t.iqn},"
                "lun=0,header-digest=crc32c")
        run("qemu-img", "convert", "--image-opts", opts, "-O", "raw", str(out))
    assert sha256(out) == sha256(disk)


def test_serve_iscsi_inside_a_trio_nursery(disk):
    """The daemon's way in: `await nursery.start(serve_iscsi, device, listen, iqn, chap)`."""
    import trio

    from obdfuse.device import RawFileDevice
    from obdfuse.iscsi import serve_iscsi

    async def main() -> str:
        device = RawFileDevice(disk)
        try:
            async with trio.open_nursery() as nursery:
                port = await nursery.start(serve_iscsi, device, "127.0.0.1:0", OBDFUSE_IQN, None)
                url = f"iscsi://127.0.0.1:{port}/{OBDFUSE_IQN}/0"
                done = await trio.run_process(["iscsi-readcapacity16", url], capture_stdout=True)
                nursery.cancel_scope.cancel()
                return done.stdout.decode()
        finally:
            await device.aclose()

    assert f"Total size:{32 << 20}" in trio.run(main)
