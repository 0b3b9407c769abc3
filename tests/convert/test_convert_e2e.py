"""`obdfuse convert` and `obdfuse build` end to end: real images, registry, FUSE, loop, ext4.

Source images are built with umoci (and re-encoded by skopeo), pushed to a real
docker-registry, converted by the CLI, then mounted with `obdfuse mount` (from an
OCI layout through a config.v1.json, or straight from the registry, lazily) and
loop-mounted; the tree must equal `umoci unpack` of the source.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from obdfuse.convert.workspace import loop_table, mounted_paths
from tests.convert.images import (
    assert_same_tree,
    build_rich_image,
    make_multi_platform,
    push_to_registry,
    recompress,
    umoci_unpack,
)
from tests.convert.tarbuild import E, make_tar
from tests.convert.test_tardir import make_tree

mounts_support = pytest.importorskip("tests.support.mounts", reason="needs the mount helper")

REPO = Path(__file__).resolve().parents[2]
A_PREFIX = "containerd.io/snapshot/overlaybd/"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def rich(tmp_path_factory) -> tuple[Path, Path]:
    """(gzip OCI layout with tag v1, umoci-unpacked rootfs) of the rich image."""
    base = tmp_path_factory.mktemp("rich")
    build_rich_image(base / "layout", "v1", base / "work", big_file_mb=4)
    return base / "layout", umoci_unpack(base / "layout", "v1", base / "bundle")


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    """One base-layer cache for the module (the base is built once)."""
    return tmp_path_factory.mktemp("obdfuse-cache")


def obdfuse_cli(
    *args: str, check: bool = True, timeout: float = 300
) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    env.pop("NOTIFY_SOCKET", None)
    proc = subprocess.run(
        [sys.executable, "-m", "obdfuse", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
        check=False,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"obdfuse {' '.join(args)} failed: {proc.stderr}")
    return proc


def obdfuse_cli_on_a_terminal(*args: str, timeout: float = 300) -> tuple[int, str, str]:
    """Run the CLI with stderr on a pseudo-terminal: (exit code, stdout, terminal output)."""
    import pty
    import select

    env = dict(os.environ, PYTHONPATH=str(REPO))
    env.pop("NOTIFY_SOCKET", None)
    master, slave = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "obdfuse", *args],
        stdout=subprocess.PIPE,
        stderr=slave,
        text=True,
        env=env,
    )
    os.close(slave)
    chunks = []
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.5)
            if ready:
                try:
                    data = os.read(master, 65536)
                except OSError:  # EIO: the other side closed
                    break
                if not data:
                    break
                chunks.append(data)
            elif proc.poll() is not None:
                break
        stdout = proc.communicate(timeout=max(1, deadline - time.monotonic()))[0]
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, stdout, b"".join(chunks).decode(errors="replace")


def layout_config(layout: Path, tag: str, where: Path) -> Path:
    """A config.v1.json whose lowers are the layer blobs of `layout:tag`."""
    index = json.loads((layout / "index.json").read_text())
    entry = next(
        m
        for m in index["manifests"]
        if m.get("annotations", {}).get("org.opencontainers.image.ref.name") == tag
    )
    manifest = json.loads((layout / "blobs/sha256" / entry["digest"][7:]).read_text())
    lowers = [{"file": str(layout / "blobs/sha256" / d["digest"][7:])} for d in manifest["layers"]]
    where.write_text(json.dumps({"lowers": lowers}))
    return where


def mount_tree(kit, image: str, tmp_path: Path, *args: str) -> Path:
    """obdfuse mount IMAGE, loop-attach read-only, mount the ext4 read-only; returns its root."""
    m = kit.mount(image, *args)
    device = kit.loop.attach(m.image_path, read_only=True)
    return kit.loop.mount(device, tmp_path / f"fs-{len(kit.mounts)}", read_only=True)


def registry_json(registry, path: str, accept: str = "") -> dict:
    req = urllib.request.Request(f"{registry.url}/v2/{path}")
    if accept:
        req.add_header("Accept", accept)
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read())


def check_overlaybd_manifest(manifest: dict, config: dict, n_source_layers: int) -> None:
    layers = manifest["layers"]
    assert len(layers) == n_source_layers + 1  # the base layer first
    for d in layers:
        ann = d["annotations"]
        assert ann[A_PREFIX + "blob-digest"] == d["digest"]
        assert ann[A_PREFIX + "blob-size"] == str(d["size"])
        assert ann[A_PREFIX + "version"] == "0.1.0"
        assert ann[A_PREFIX + "blob-fs-type"] == "ext4"
        assert d["mediaType"] == "application/vnd.oci.image.layer.v1.tar"
    assert config["rootfs"]["diff_ids"] == [d["digest"] for d in layers]
    assert config["config"]["Entrypoint"] == ["/bin/app"]
    assert "APP_MODE=test" in config["config"]["Env"]
    assert config["config"]["WorkingDir"] == "/srv"
    assert config["config"]["Labels"] == {"org.example": "rich"}


def test_convert_from_registry_to_registry_and_mount_from_it(
    rich, cache_dir, registry, mounts, tmp_path
) -> None:
    layout, reference = rich
    push_to_registry(layout, "v1", f"{registry.host}/src:v1")
    out = obdfuse_cli(
        "convert",
        "--cache-dir",
        str(cache_dir),
        f"{registry.host}/src:v1",
        f"{registry.host}/obd:v1",
    )
    assert out.stdout.strip().startswith(f"{registry.host}/obd:v1@sha256:")
    assert out.stderr == ""  # quiet when stderr is not a terminal

    manifest = registry_json(
        registry, "obd/manifests/v1", "application/vnd.oci.image.manifest.v1+json"
    )
    config = registry_json(registry, f"obd/blobs/{manifest['config']['digest']}")
    check_overlaybd_manifest(manifest, config, 4)

    root = mount_tree(
        mounts, f"{registry.host}/obd:v1", tmp_path, "--cache-dir", str(tmp_path / "blob-cache")
    )
    assert_same_tree(root, reference)


def _allocated(path: Path) -> int:
    return sum(f.stat().st_blocks * 512 for f in path.rglob("*") if f.is_file())


def run_umoci_image(layout: Path, tree: Path) -> None:
    """A one-layer gzip OCI image of `tree` (umoci insert)."""
    from tests.convert.images import run

    run("umoci", "init", "--layout", layout)
    run("umoci", "new", "--image", f"{layout}:v1")
    run("umoci", "insert", "--image", f"{layout}:v1", tree, "/")


def test_converted_image_mounts_lazily_from_the_registry(cache_dir, registry, mounts, tmp_path):
    tree = tmp_path / "tree"
    (tree / "data").mkdir(parents=True)
    (tree / "data/big").write_bytes(os.urandom(24 << 20))  # incompressible
    (tree / "etc").mkdir()
    (tree / "etc/hostname").write_text("lazy\n")
    run_umoci_image(tmp_path / "layout", tree)
    push_to_registry(tmp_path / "layout", "v1", f"{registry.host}/lazy-src:v1")
    rc, stdout, terminal = obdfuse_cli_on_a_terminal(
        "convert",
        "--cache-dir",
        str(cache_dir),
        f"{registry.host}/lazy-src:v1",
        f"{registry.host}/lazy:v1",
    )
    assert rc == 0, terminal
    assert stdout.startswith(f"{registry.host}/lazy:v1@sha256:")
    for step in ("download", "apply layer 1/1", "commit layer-0", "upload"):
        assert step in terminal, f"no {step!r} progress bar on the terminal: {terminal!r}"
    manifest = registry_json(
        registry, "lazy/manifests/v1", "application/vnd.oci.image.manifest.v1+json"
    )
    total = sum(d["size"] for d in manifest["layers"])
    assert total > 24 << 20
    blob_cache = tmp_path / "blob-cache"
    root = mount_tree(mounts, f"{registry.host}/lazy:v1", tmp_path, "--cache-dir", str(blob_cache))
    assert (root / "etc/hostname").read_text() == "lazy\n"
    fetched = _allocated(blob_cache)
    assert fetched < total // 4, f"not lazy: {fetched} of {total} bytes fetched for one file"
    assert (root / "data/big").read_bytes() == (tree / "data/big").read_bytes()
    assert _allocated(blob_cache) > fetched + (20 << 20)


@pytest.mark.parametrize("fmt", ["zstd", "tar"])
def test_convert_layouts_of_every_compression(rich, cache_dir, mounts, tmp_path, fmt) -> None:
    layout, reference = rich
    src = tmp_path / "src"
    recompress(layout, "v1", src, fmt)
    out = tmp_path / "out"
    obdfuse_cli(
        "convert",
        "--cache-dir",
        str(cache_dir),
        "--algorithm",
        "zstd",
        "--block-size",
        "16K",
        f"oci:{src}:v1",
        f"oci:{out}:obd",
    )
    config = layout_config(out, "obd", tmp_path / "config.v1.json")
    assert_same_tree(mount_tree(mounts, str(config), tmp_path), reference)


def test_build_from_a_directory(cache_dir, registry, mounts, tmp_path) -> None:
    tree = tmp_path / "tree"
    make_tree(tree)
    out = obdfuse_cli(
        "build",
        "--cache-dir",
        str(cache_dir),
        "--entrypoint",
        "/bin/su -c x",
        "--env",
        "A=1",
        str(tree),
        f"{registry.host}/built:1",
    )
    assert out.stdout.strip().startswith(f"{registry.host}/built:1@sha256:")
    manifest = registry_json(
        registry, "built/manifests/1", "application/vnd.oci.image.manifest.v1+json"
    )
    config = registry_json(registry, f"built/blobs/{manifest['config']['digest']}")
    assert config["config"] == {"Entrypoint": ["/bin/su", "-c", "x"], "Env": ["A=1"]}
    assert len(manifest["layers"]) == 2
    root = mount_tree(
        mounts, f"{registry.host}/built:1", tmp_path, "--cache-dir", str(tmp_path / "blob-cache")
    )
    assert_same_tree(root, tree)


def test_build_from_a_directory_into_a_layout(cache_dir, mounts, tmp_path) -> None:
    tree = tmp_path / "tree"
    make_tree(tree)
    obdfuse_cli("build", "--cache-dir", str(cache_dir), str(tree), f"oci:{tmp_path / 'lay'}")
    config_file = layout_config(tmp_path / "lay", "latest", tmp_path / "c.json")
    assert_same_tree(mount_tree(mounts, str(config_file), tmp_path), tree)


def test_base_layer_is_reproducible_and_a_clean_ext4(mounts, tmp_path) -> None:
    (tmp_path / "empty").mkdir()
    layers = []
    for cache in ("c1", "c2"):
        obdfuse_cli(
            "build",
            "--cache-dir",
            str(tmp_path / cache),
            str(tmp_path / "empty"),
            f"oci:{tmp_path / cache}-out",
        )
        layers += sorted((tmp_path / cache / "base").glob("*.layer"))
    assert [p.name for p in layers] == ["ext4-64G-lz4-4k.layer"] * 2
    mine = layers
    assert layers[0].read_bytes() == layers[1].read_bytes(), "base layer not reproducible"
    m = mounts.mount(str(mine[0]))
    assert m.image_path.stat().st_size == 64 << 30
    device = mounts.loop.attach(m.image_path, read_only=True)
    fsck = subprocess.run(["e2fsck", "-fn", device], capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr


def _leftovers(work: Path) -> list[str]:
    """Mounts, loop devices or files left under a work dir."""
    left = [p for p in mounted_paths() if p.startswith(str(work))]
    return left + [dev for dev, file in loop_table() if file.startswith(str(work))]


def test_corrupt_layer_fails_clearly_and_leaves_nothing(rich, cache_dir, tmp_path) -> None:
    layout, _ = rich
    src = tmp_path / "src"
    recompress(layout, "v1", src, "tar")
    index = json.loads((src / "index.json").read_text())
    manifest = json.loads((src / "blobs/sha256" / index["manifests"][0]["digest"][7:]).read_text())
    blob = src / "blobs/sha256" / manifest["layers"][1]["digest"][7:]
    data = bytearray(blob.read_bytes())
    data[700] ^= 1
    blob.write_bytes(bytes(data))
    work = tmp_path / "work"
    out = obdfuse_cli(
        "convert",
        "--cache-dir",
        str(cache_dir),
        "--work-dir",
        str(work),
        f"oci:{src}:v1",
        f"oci:{tmp_path / 'out'}",
        check=False,
    )
    assert out.returncode == 1
    assert out.stderr.count("\n") == 1 and "does not match" in out.stderr, out.stderr
    assert _leftovers(work) == [] and list(work.iterdir()) == []
    assert not (tmp_path / "out").exists()


def test_hostile_layer_fails_and_writes_nothing_outside(cache_dir, tmp_path) -> None:
    from obdfuse.convert.oci import OCI_CONFIG, OCI_LAYER_TAR, OCI_MANIFEST, OciLayout, digest_of

    layer = make_tar([E("etc/ok", data=b"fine"), E("../../../../escaped", data=b"pwned")])
    lay = OciLayout(tmp_path / "evil")
    lay.init()
    ldesc = lay.put_bytes(layer, OCI_LAYER_TAR)
    cfg = json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "rootfs": {"type": "layers", "diff_ids": [digest_of(layer)]},
        }
    ).encode()
    cdesc = lay.put_bytes(cfg, OCI_CONFIG)
    mdesc = lay.put_bytes(
        json.dumps(
            {
                "schemaVersion": 2,
                "mediaType": OCI_MANIFEST,
                "config": cdesc.to_json(),
                "layers": [ldesc.to_json()],
            }
        ).encode(),
        OCI_MANIFEST,
    )
    lay.tag(mdesc, "v1")
    work = tmp_path / "work"
    out = obdfuse_cli(
        "convert",
        "--cache-dir",
        str(cache_dir),
        "--work-dir",
        str(work),
        f"oci:{tmp_path / 'evil'}:v1",
        f"oci:{tmp_path / 'out'}",
        check=False,
    )
    assert out.returncode == 1
    assert "'../../../../escaped'" in out.stderr and "'..'" in out.stderr, out.stderr
    assert not list(Path("/").glob("escaped")) and not (tmp_path / "escaped").exists()
    assert _leftovers(work) == []


def _convert_until_mounted(layout: Path, cache_dir: Path, work: Path, out: Path):
    """Start `obdfuse convert` and return once a layer's ext4 is mounted in `work`."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "obdfuse", "convert", "--cache-dir", str(cache_dir)]
    cmd += ["--work-dir", str(work), f"oci:{layout}:v1", f"oci:{out}"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 60
    while not any(p.startswith(str(work)) and p.endswith("/rootfs") for p in mounted_paths()):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"no layer got mounted: {proc.communicate()[1]}")
        time.sleep(0.005)
    return proc


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupted_convert_leaves_nothing_mounted(rich, cache_dir, tmp_path, sig) -> None:
    layout, _ = rich
    work = tmp_path / "work"
    for _attempt in range(3):
        proc = _convert_until_mounted(layout, cache_dir, work, tmp_path / "out")
        try:
            if proc.poll() is not None:
                # The convert finished between the mount and the signal (a stalled
                # test process on a loaded machine): nothing was interrupted, retry.
                proc.communicate(timeout=120)
                continue
            proc.send_signal(sig)
            _, err = proc.communicate(timeout=120)
            break
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    else:
        pytest.fail("the convert always finished before it could be interrupted")
    assert proc.returncode != 0
    assert "Traceback" not in err, err
    assert _leftovers(work) == []
    assert list(work.iterdir()) == []


def test_a_killed_convert_is_cleaned_up_by_the_next(rich, cache_dir, tmp_path) -> None:
    layout, _ = rich
    work = tmp_path / "work"
    proc = _convert_until_mounted(layout, cache_dir, work, tmp_path / "out")
    proc.kill()  # kill -9: no chance to clean up
    proc.wait()
    assert _leftovers(work), "expected the killed run to leave its mounts behind"
    obdfuse_cli(
        "convert",
        "--cache-dir",
        str(cache_dir),
        "--work-dir",
        str(work),
        f"oci:{layout}:v1",
        f"oci:{tmp_path / 'out'}",
    )
    assert _leftovers(work) == [] and list(work.iterdir()) == []


def test_multi_platform_source_from_the_registry(rich, cache_dir, registry, mounts, tmp_path):
    layout, reference = rich
    multi = make_multi_platform(layout, "v1", tmp_path / "multi")
    push_to_registry(multi, "multi", f"{registry.host}/multi:1")
    for platform, arch in (("linux/arm64", "arm64"), ("linux/amd64", "amd64")):
        repo = f"obd-{arch}"
        obdfuse_cli(
            "convert",
            "--cache-dir",
            str(cache_dir),
            "--platform",
            platform,
            "--docker-media-types",
            f"{registry.host}/multi:1",
            f"{registry.host}/{repo}:1",
        )
        manifest = registry_json(
            registry, f"{repo}/manifests/1", "application/vnd.docker.distribution.manifest.v2+json"
        )
        assert manifest["mediaType"] == "application/vnd.docker.distribution.manifest.v2+json"
        assert manifest["config"]["mediaType"] == "application/vnd.docker.container.image.v1+json"
        assert {d["mediaType"] for d in manifest["layers"]} == {
            "application/vnd.docker.image.rootfs.diff.tar"
        }
        config = registry_json(registry, f"{repo}/blobs/{manifest['config']['digest']}")
        assert config["architecture"] == arch
        assert ("VARIANT=arm64" in config["config"]["Env"]) == (arch == "arm64")
    root = mount_tree(
        mounts,
        f"{registry.host}/obd-arm64:1",
        tmp_path,
        "--cache-dir",
        str(tmp_path / "blob-cache"),
    )
    assert_same_tree(root, reference)


def test_refuses_an_image_that_is_already_overlaybd(cache_dir, tmp_path) -> None:
    tree = tmp_path / "tree"
    tree.mkdir()
    obdfuse_cli("build", "--cache-dir", str(cache_dir), str(tree), f"oci:{tmp_path / 'obd'}:1")
    out = obdfuse_cli(
        "convert",
        "--cache-dir",
        str(cache_dir),
        f"oci:{tmp_path / 'obd'}:1",
        f"oci:{tmp_path / 'again'}",
        check=False,
    )
    assert out.returncode == 1 and "already an overlaybd image" in out.stderr, out.stderr


def test_unreachable_registries_fail_in_one_line_and_leave_nothing(
    rich, cache_dir, registry, tmp_path
) -> None:
    layout, _ = rich
    work = tmp_path / "work"
    registry.stop()  # nothing listens there any more
    timeout = ("--registry-timeout", "2")
    out = obdfuse_cli(
        "convert",
        "--cache-dir",
        str(cache_dir),
        "--work-dir",
        str(work),
        *timeout,
        f"{registry.host}/src:v1",
        f"oci:{tmp_path / 'out'}",
        check=False,
    )
    assert out.returncode == 1 and out.stderr.count("\n") == 1, out.stderr
    assert registry.host in out.stderr
    out = obdfuse_cli(
        "convert",
        "--cache-dir",
        str(cache_dir),
        "--work-dir",
        str(work),
        *timeout,
        f"oci:{layout}:v1",
        f"{registry.host}/dst:v1",
        check=False,
    )
    assert out.returncode == 1 and out.stderr.count("\n") == 1, out.stderr
    assert _leftovers(work) == [] and list(work.iterdir()) == []


def test_refuses_more_layers_than_overlaybd_can_stack(cache_dir, tmp_path) -> None:
    from obdfuse.convert.oci import OCI_CONFIG, OCI_LAYER_TAR, OCI_MANIFEST, OciLayout

    lay = OciLayout(tmp_path / "many")
    lay.init()
    layers = [lay.put_bytes(make_tar([E(f"f{i}", data=b"x")]), OCI_LAYER_TAR) for i in range(255)]
    cfg = lay.put_bytes(
        json.dumps({"rootfs": {"type": "layers", "diff_ids": [d.digest for d in layers]}}).encode(),
        OCI_CONFIG,
    )
    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": cfg.to_json(),
        "layers": [d.to_json() for d in layers],
    }
    lay.tag(lay.put_bytes(json.dumps(manifest).encode(), OCI_MANIFEST), "v1")
    out = obdfuse_cli(
        "convert",
        "--cache-dir",
        str(cache_dir),
        f"oci:{tmp_path / 'many'}:v1",
        f"oci:{tmp_path / 'out'}",
        check=False,
    )
    assert out.returncode == 1 and "has 255 layers" in out.stderr, out.stderr


def test_corrupt_blob_in_the_source_registry(rich, cache_dir, registry, tmp_path) -> None:
    layout, _ = rich
    push_to_registry(layout, "v1", f"{registry.host}/src:v1")
    manifest = registry_json(
        registry, "src/manifests/v1", "application/vnd.oci.image.manifest.v1+json"
    )
    blob = registry.blob_path(manifest["layers"][1]["digest"])
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0xFF
    blob.write_bytes(bytes(data))
    work = tmp_path / "work"
    out = obdfuse_cli(
        "convert",
        "--cache-dir",
        str(cache_dir),
        "--work-dir",
        str(work),
        f"{registry.host}/src:v1",
        f"oci:{tmp_path / 'out'}",
        check=False,
    )
    assert out.returncode == 1 and out.stderr.count("\n") == 1, out.stderr
    assert "digest" in out.stderr and manifest["layers"][1]["digest"] in out.stderr
    assert _leftovers(work) == [] and list(work.iterdir()) == []
    assert not (tmp_path / "out").exists()


def test_private_registry_needs_and_uses_credentials(cache_dir, tmp_path) -> None:
    from tests.support.registry import RegistryServer

    tree = tmp_path / "tree"
    (tree / "etc").mkdir(parents=True)
    (tree / "etc/secret").write_text("s3")
    run_umoci_image(tmp_path / "layout", tree)
    with RegistryServer(tmp_path / "reg", users={"alice": "pw"}) as private:
        dst = f"{private.host}/app:1"
        out = obdfuse_cli(
            "convert",
            "--cache-dir",
            str(cache_dir),
            "--registry-timeout",
            "5",
            f"oci:{tmp_path / 'layout'}:v1",
            dst,
            check=False,
        )
        assert out.returncode == 1 and out.stderr.count("\n") == 1, out.stderr
        obdfuse_cli(
            "convert",
            "--cache-dir",
            str(cache_dir),
            "--creds",
            "alice:pw",
            f"oci:{tmp_path / 'layout'}:v1",
            dst,
        )
        # and back out of it, as a source (an overlaybd image is refused as such)
        out = obdfuse_cli(
            "convert",
            "--cache-dir",
            str(cache_dir),
            "--creds",
            "alice:pw",
            dst,
            f"oci:{tmp_path / 'again'}",
            check=False,
        )
        assert "already an overlaybd image" in out.stderr, out.stderr


def test_vsize_and_zstd_make_their_own_base_layer(mounts, tmp_path) -> None:
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "hello").write_text("small disk")
    cache = tmp_path / "cache"
    obdfuse_cli(
        "build",
        "--cache-dir",
        str(cache),
        "--vsize",
        "2G",
        "--algorithm",
        "zstd",
        str(tree),
        f"oci:{tmp_path / 'out'}:small",
    )
    assert [p.name for p in (cache / "base").glob("*.layer")] == ["ext4-2G-zstd-4k.layer"]
    m = mounts.mount(str(layout_config(tmp_path / "out", "small", tmp_path / "c.json")))
    assert m.image_path.stat().st_size == 2 << 30
    device = mounts.loop.attach(m.image_path, read_only=True)
    root = mounts.loop.mount(device, tmp_path / "fs", read_only=True)
    assert (root / "hello").read_text() == "small disk"
