"""`obdfuse mount --iscsi`: one daemon serves the image through FUSE and iSCSI at once."""

from __future__ import annotations

import hashlib
import socket
import subprocess

from tests.support.iscsi import wait_for_port
from tests.support.registry import free_port

IQN = "iqn.2024-01.io.obdfuse:mounted"
L1_IMAGE_SHA256 = "252cf2c39aecbcbe30bcae47ebf8fc40c858b862c679dd03163608a994a0ed39"


def _sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def test_mounted_image_is_also_an_iscsi_lun(mounts, samples, tmp_path) -> None:
    port = free_port()
    m = mounts.mount(samples / "layers" / "l1.commit.lz4.zfile",
                     "--iscsi", f"127.0.0.1:{port}", "--iqn", IQN)
    wait_for_port(port)
    out = tmp_path / "via-iscsi.img"
    subprocess.run(
        ["qemu-img", "convert", "-O", "raw", f"iscsi://127.0.0.1:{port}/{IQN}/0", str(out)],
        check=True, capture_output=True, timeout=120,
    )
    assert _sha256(out) == L1_IMAGE_SHA256
    assert _sha256(m.image_path) == L1_IMAGE_SHA256
    proc = m.umount()
    assert proc.returncode == 0, proc.stderr
    with socket.socket() as s:  # the target went away with the daemon
        assert s.connect_ex(("127.0.0.1", port)) != 0


def test_iscsi_port_in_use_fails_before_mounting(mounts, samples, tmp_path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        mnt = tmp_path / "mnt"
        mnt.mkdir()
        proc = mounts.obdfuse("mount", "--iscsi", f"127.0.0.1:{port}",
                              str(samples / "layers" / "l1.commit"), str(mnt))
    assert proc.returncode != 0
    assert f"127.0.0.1:{port}" in proc.stderr and "Traceback" not in proc.stderr
    with open("/proc/mounts") as f:
        assert not any(str(mnt) in line for line in f)


def test_iscsi_serve_reads_a_registry_image_lazily(registry, samples, tmp_path) -> None:
    import sys

    from tests.support.iscsi import ObdfuseTarget

    ref = f"{registry.host}/l1:v1"
    push = subprocess.run(
        [sys.executable, "-m", "obdfuse", "push", str(samples / "layers" / "l1.commit.lz4.zfile"),
         ref], capture_output=True, text=True, timeout=120,
    )
    assert push.returncode == 0, push.stderr
    out = tmp_path / "via-iscsi.img"
    with ObdfuseTarget("--cache-dir", str(tmp_path / "cache"), ref) as target:
        subprocess.run(["qemu-img", "convert", "-O", "raw", target.url, str(out)],
                       check=True, capture_output=True, timeout=120)
    assert _sha256(out) == L1_IMAGE_SHA256
    assert any((tmp_path / "cache").rglob("*")), "the registry image was read through the cache"


def test_mount_iscsi_with_chap(mounts, samples) -> None:
    port = free_port()
    mounts.mount(samples / "layers" / "l1.commit", "--iscsi", f"127.0.0.1:{port}",
                 "--iqn", IQN, "--chap", "alice:secret-of-alice")
    wait_for_port(port)
    url = f"127.0.0.1:{port}/{IQN}/0"
    good = subprocess.run(["iscsi-inq", f"iscsi://alice%secret-of-alice@{url}"],
                          capture_output=True, text=True, timeout=60)
    assert good.returncode == 0, good.stderr
    assert "DIRECT_ACCESS" in good.stdout
    for bad_url in (f"iscsi://{url}", f"iscsi://alice%wrong-secret-xx@{url}"):
        bad = subprocess.run(["iscsi-inq", bad_url], capture_output=True, text=True, timeout=60)
        assert bad.returncode != 0


def test_iscsi_options_without_iscsi_are_a_usage_error(mounts, samples, tmp_path) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    proc = mounts.obdfuse("mount", "--chap", "alice:secret-of-alice",
                          str(samples / "layers" / "l1.commit"), str(mnt))
    assert proc.returncode != 0
    assert "--iscsi HOST:PORT" in proc.stderr and "Traceback" not in proc.stderr
