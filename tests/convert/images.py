"""Real OCI test images built with umoci (and re-encoded with skopeo), and tree comparison.

The rich image has several layers holding every kind of entry a converter must get right:
regular/empty/sparse files, setuid/setgid/sticky modes, other owners, symlinks (relative,
absolute, dangling), hard links, a fifo, a char device, xattrs, whiteouts of a file and a
directory, and an opaque directory.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from pathlib import Path


def run(*cmd: str | os.PathLike[str]) -> str:
    r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd))} failed: {r.stderr.strip()}")
    return r.stdout


def _write(path: Path, data: bytes, mode: int = 0o644, owner: tuple[int, int] = (0, 0)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    os.chown(path, *owner)
    os.chmod(path, mode)


def build_rich_image(layout: Path, tag: str, work: Path, *, big_file_mb: int = 0) -> None:
    """An OCI layout `layout` with image `tag` of four layers (gzip, as umoci writes)."""
    work.mkdir(parents=True, exist_ok=True)
    if not (layout / "index.json").exists():
        run("umoci", "init", "--layout", layout)
    image = f"{layout}:{tag}"
    run("umoci", "new", "--image", image)
    run(
        "umoci",
        "config",
        "--image",
        image,
        "--config.entrypoint",
        "/bin/app",
        "--config.env",
        "APP_MODE=test",
        "--config.workingdir",
        "/srv",
        "--config.user",
        "1000:1000",
        "--config.label",
        "org.example=rich",
    )
    bundle = work / "bundle"

    # layer 1: a little root filesystem
    run("umoci", "unpack", "--image", image, bundle)
    r = bundle / "rootfs"
    _write(r / "bin/app", b"#!/bin/sh\necho app\n", 0o755)
    _write(r / "bin/su", b"setuid program", 0o4755)
    _write(r / "bin/wall", b"setgid program", 0o2755, (0, 5))
    (r / "tmp").mkdir()
    os.chmod(r / "tmp", 0o1777)
    _write(r / "home/user/.profile", b"export A=1\n", 0o600, (1000, 1000))
    os.chown(r / "home/user", 1000, 1000)
    os.chmod(r / "home/user", 0o700)
    _write(r / "etc/os-release", b"NAME=rich\n")
    _write(r / "etc/empty", b"")
    os.symlink("os-release", r / "etc/os-release.rel")
    os.symlink("/etc/os-release", r / "etc/os-release.abs")
    os.symlink("/does/not/exist", r / "etc/dangling")
    os.link(r / "bin/app", r / "bin/app-hardlink")
    os.mkfifo(r / "run-fifo", 0o640)
    os.mknod(r / "dev-null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    _write(r / "etc/with-xattr", b"xattr carrier")
    os.setxattr(r / "etc/with-xattr", "user.comment", b"hello xattr")
    os.setxattr(r / "etc/with-xattr", "trusted.binary", bytes([0, 1, 2, 255, 254]))
    _write(r / "old/gone-file", b"will be whited out")
    _write(r / "old/gone-dir/inner", b"will be whited out with its dir")
    _write(r / "opaque/lower-a", b"hidden by the opaque dir")
    _write(r / "opaque/lower-dir/b", b"also hidden")
    (r / "srv").mkdir()
    with open(r / "srv/sparse", "wb") as f:
        f.seek(5 << 20)
        f.write(b"end of sparse file")
    if big_file_mb:
        _write(r / "srv/big", os.urandom(big_file_mb << 20))
    run("umoci", "repack", "--image", image, bundle)
    shutil.rmtree(bundle)

    # layer 2: deletions (whiteouts), changes of content, mode, owner and xattrs
    run("umoci", "unpack", "--image", image, bundle)
    r = bundle / "rootfs"
    os.unlink(r / "old/gone-file")
    shutil.rmtree(r / "old/gone-dir")
    _write(r / "etc/os-release", b"NAME=rich\nVERSION=2\n")
    os.chmod(r / "etc/empty", 0o4711)
    os.chown(r / "etc/empty", 123, 456)
    os.setxattr(r / "etc/with-xattr", "user.second", b"added in layer 2")
    _write(r / "srv/data/layer2", b"from layer two", 0o640, (1000, 1000))
    os.link(r / "srv/data/layer2", r / "srv/data/layer2-link")
    run("umoci", "repack", "--image", image, bundle)
    shutil.rmtree(bundle)

    # layer 3: an opaque directory replacing /opaque
    src = work / "opaque-src"
    _write(src / "upper-only", b"only this survives", 0o644)
    run("umoci", "insert", "--image", image, "--opaque", src, "/opaque")

    # layer 4: an explicit whiteout of a file from layer 1
    run("umoci", "insert", "--image", image, "--whiteout", "/etc/dangling")
    shutil.rmtree(work)


def recompress(src_layout: Path, tag: str, dst_layout: Path, fmt: str) -> None:
    """Copy an image into another layout with layers as `zstd`, `gzip` or plain `tar`."""
    if fmt == "tar":  # skopeo decompresses only into dir:, and then copies as-is
        plain = dst_layout.with_name(dst_layout.name + ".dir")
        run("skopeo", "copy", "-q", "--dest-decompress", f"oci:{src_layout}:{tag}", f"dir:{plain}")
        run(
            "skopeo",
            "copy",
            "-q",
            "--dest-oci-accept-uncompressed-layers",
            f"dir:{plain}",
            f"oci:{dst_layout}:{tag}",
        )
        shutil.rmtree(plain)
        return
    args = ["--dest-compress-format", fmt]
    run("skopeo", "copy", "-q", *args, f"oci:{src_layout}:{tag}", f"oci:{dst_layout}:{tag}")


def make_multi_platform(src_layout: Path, tag: str, dst: Path) -> Path:
    """A layout whose tag `multi` is an index of an amd64 and an arm64 image.

    Both share the layers of `src_layout:tag`; the arm64 one has its own config
    (architecture arm64, env VARIANT=arm64) so a test can tell which was chosen.
    """
    import json

    from obdfuse.convert.oci import OCI_INDEX, Descriptor, OciLayout

    recompress(src_layout, tag, dst, "gzip")
    out = OciLayout(dst)
    entry = json.loads((dst / "index.json").read_text())["manifests"][0]
    manifest = json.loads(out.read_small(Descriptor.from_json(entry, "t"), 1 << 20, "manifest"))
    config = json.loads(
        out.read_small(Descriptor.from_json(manifest["config"], "c"), 1 << 20, "config")
    )
    config["architecture"] = "arm64"
    config["variant"] = "v8"
    config["config"]["Env"] = [*config["config"].get("Env", []), "VARIANT=arm64"]
    arm_config = out.put_bytes(json.dumps(config).encode(), manifest["config"]["mediaType"])
    arm_manifest = dict(manifest, config=arm_config.to_json())
    arm = out.put_bytes(json.dumps(arm_manifest).encode(), entry["mediaType"])
    amd = {k: v for k, v in entry.items() if k != "annotations"}
    index = {
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": [
            dict(arm.to_json(), platform={"os": "linux", "architecture": "arm64", "variant": "v8"}),
            dict(amd, platform={"os": "linux", "architecture": "amd64"}),
        ],
    }
    out.tag(out.put_bytes(json.dumps(index).encode(), OCI_INDEX), "multi")
    return dst


def push_to_registry(layout: Path, tag: str, ref: str) -> None:
    """Copy an image (or a whole multi-platform index) from a layout into a registry."""
    run(
        "skopeo",
        "copy",
        "-q",
        "--all",
        "--dest-tls-verify=false",
        f"oci:{layout}:{tag}",
        f"docker://{ref}",
    )


def umoci_unpack(layout: Path, tag: str, bundle: Path) -> Path:
    """The reference extraction of an image: umoci unpack; returns the rootfs path."""
    run("umoci", "unpack", "--image", f"{layout}:{tag}", bundle)
    return bundle / "rootfs"


# ----------------------------------------------------------------------------- comparison


def describe_tree(root: Path, *, ignore: tuple[str, ...] = ("lost+found",)) -> dict[str, dict]:
    """Everything that must survive a conversion, per relative path (not following links)."""
    out: dict[str, dict] = {}
    inode_first: dict[int, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        if Path(dirpath) == root:
            dirnames[:] = [d for d in dirnames if d not in ignore]
            filenames = [f for f in filenames if f not in ignore]
        for name in sorted(dirnames + filenames):
            p = Path(dirpath, name)
            rel = str(p.relative_to(root))
            st = p.lstat()
            info: dict = {
                "mode": oct(st.st_mode),
                "uid": st.st_uid,
                "gid": st.st_gid,
                "xattrs": {
                    k: os.getxattr(p, k, follow_symlinks=False)
                    for k in sorted(os.listxattr(p, follow_symlinks=False))
                },
            }
            if stat.S_ISREG(st.st_mode):
                info["data"] = p.read_bytes()
                info["mtime"] = st.st_mtime_ns
                if st.st_nlink > 1:
                    info["hardlink_group"] = inode_first.setdefault(st.st_ino, rel)
            elif stat.S_ISLNK(st.st_mode):
                info["target"] = os.readlink(p)
                info["mtime"] = st.st_mtime_ns
            elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
                info["rdev"] = (os.major(st.st_rdev), os.minor(st.st_rdev))
            out[rel] = info
    return out


def assert_same_tree(got: Path, want: Path) -> None:
    """Fail with the first few differences between two trees."""
    a, b = describe_tree(got), describe_tree(want)
    problems = []
    for rel in sorted(set(a) | set(b)):
        if rel not in a:
            problems.append(f"missing: {rel}")
        elif rel not in b:
            problems.append(f"unexpected: {rel}")
        elif a[rel] != b[rel]:
            diff = {
                k: (a[rel].get(k), b[rel].get(k))
                for k in set(a[rel]) | set(b[rel])
                if a[rel].get(k) != b[rel].get(k)
            }
            problems.append(f"differs: {rel}: {diff}")
    assert not problems, "trees differ:\n" + "\n".join(problems[:20])
