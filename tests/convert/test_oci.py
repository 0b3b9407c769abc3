"""OCI layouts: resolving tags and platforms, verifying blobs, applying real umoci images."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from obdfuse.convert.apply import apply_layer
from obdfuse.convert.oci import (
    Descriptor,
    OciLayout,
    Platform,
    digest_of,
    parse_layout_ref,
)
from obdfuse.errors import CorruptDataError, FormatError
from tests.convert.images import (
    assert_same_tree,
    build_rich_image,
    make_multi_platform,
    recompress,
    umoci_unpack,
)


@pytest.fixture(scope="module")
def rich(tmp_path_factory) -> tuple[Path, Path]:
    """(layout, umoci-unpacked rootfs) of the rich test image, built once per module."""
    base = tmp_path_factory.mktemp("rich")
    layout = base / "layout"
    build_rich_image(layout, "v1", base / "work")
    rootfs = umoci_unpack(layout, "v1", base / "bundle")
    return layout, rootfs


def apply_all(image, root: Path) -> None:
    for i, desc in enumerate(image.layers):
        apply_layer(image.open_blob(desc), root, layer_name=f"layer {i}")


@pytest.mark.parametrize("fmt", ["gzip", "zstd", "tar"])
def test_applying_a_real_image_equals_umoci_unpack(rich, tmp_path: Path, fmt: str) -> None:
    layout, reference = rich
    if fmt != "gzip":
        recompress(layout, "v1", tmp_path / "re", fmt)
        layout = tmp_path / "re"
    image = OciLayout(layout).resolve("v1")
    assert len(image.layers) == 4
    assert image.config["config"]["Entrypoint"] == ["/bin/app"]
    root = tmp_path / "root"
    root.mkdir()
    apply_all(image, root)
    assert_same_tree(root, reference)
    assert not (root / "opaque/lower-a").exists() and (root / "opaque/upper-only").exists()
    assert not (root / "old/gone-dir").exists() and not (root / "etc/dangling").is_symlink()


def test_layout_refs() -> None:
    assert parse_layout_ref("oci:/x/y:tag") == (Path("/x/y"), "tag")
    assert parse_layout_ref("oci:/x/y") == (Path("/x/y"), None)
    assert parse_layout_ref("oci:rel") == (Path("rel"), None)
    assert parse_layout_ref("127.0.0.1:5000/app:1") is None


def test_untagged_choice_and_missing_tag(rich) -> None:
    layout, _ = rich
    assert OciLayout(layout).resolve(None).name.startswith("oci:")  # the only image
    with pytest.raises(FormatError, match="no manifest tagged 'nope'"):
        OciLayout(layout).resolve("nope")


def test_multi_platform_index_selects_by_platform(rich, tmp_path: Path) -> None:
    layout, _ = rich
    out = OciLayout(make_multi_platform(layout, "v1", tmp_path / "multi"))
    amd = out.resolve("multi", platform=Platform.parse("linux/amd64"))
    arm = out.resolve("multi", platform=Platform.parse("linux/arm64/v8"))
    assert amd.manifest_desc.digest != arm.manifest_desc.digest
    assert amd.manifest_desc.platform == {"os": "linux", "architecture": "amd64"}
    assert arm.config["architecture"] == "arm64" and amd.config["architecture"] == "amd64"
    with pytest.raises(FormatError, match=r"no manifest for platform linux/s390x \(available"):
        out.resolve("multi", platform=Platform.parse("linux/s390x"))


def test_corrupt_layer_blob_fails_its_digest(rich, tmp_path: Path) -> None:
    layout, _ = rich
    recompress(layout, "v1", tmp_path / "c", "tar")
    image = OciLayout(tmp_path / "c").resolve("v1")
    desc = image.layers[0]
    path = OciLayout(tmp_path / "c").blob_path(desc.digest)
    data = bytearray(path.read_bytes())
    data[600] ^= 0xFF  # inside the first file's content: the tar still parses
    path.write_bytes(bytes(data))
    root = tmp_path / "root"
    root.mkdir()
    with pytest.raises(CorruptDataError, match="does not match"):
        apply_layer(image.open_blob(desc), root)


def test_corrupt_gzip_layer_reports_the_digest(rich, tmp_path: Path) -> None:
    layout, _ = rich
    recompress(layout, "v1", tmp_path / "g", "gzip")
    image = OciLayout(tmp_path / "g").resolve("v1")
    desc = image.layers[0]
    path = OciLayout(tmp_path / "g").blob_path(desc.digest)
    data = bytearray(path.read_bytes())
    for i in range(2000, 2100):
        data[i] ^= 0x55
    path.write_bytes(bytes(data))
    root = tmp_path / "root"
    root.mkdir()
    with pytest.raises(CorruptDataError, match="does not match"):
        apply_layer(image.open_blob(desc), root)


def test_longer_blob_than_declared_fails_early(tmp_path: Path) -> None:
    out = OciLayout(tmp_path / "l")
    out.init()
    desc = out.put_bytes(b"x" * 100, "application/octet-stream")
    short = Descriptor(desc.media_type, desc.digest, 10)
    with pytest.raises(CorruptDataError, match="more than the declared 10 bytes"):
        out.open_blob(short).read(4096)


@pytest.mark.parametrize(
    "index",
    [
        b"not json",
        b'{"manifests": [{"digest": "sha256:../../../etc/passwd", "size": 1}]}',
        b'{"manifests": [{"digest": "sha256:' + b"a" * 64 + b'", "size": -1}]}',
        b'{"manifests": []}',
        b"[]",
    ],
)
def test_hostile_index_is_rejected(tmp_path: Path, index: bytes) -> None:
    out = OciLayout(tmp_path / "h")
    out.init()
    (tmp_path / "h/index.json").write_bytes(index)
    with pytest.raises(FormatError):
        out.resolve(None)


def test_written_layout_round_trips(tmp_path: Path) -> None:
    out = OciLayout(tmp_path / "w")
    out.init()
    layer = out.put_bytes(b"layer bytes", "application/vnd.oci.image.layer.v1.tar")
    config = out.put_bytes(
        json.dumps({"rootfs": {"type": "layers", "diff_ids": [layer.digest]}}).encode(),
        "application/vnd.oci.image.config.v1+json",
    )
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": config.to_json(),
        "layers": [layer.to_json()],
    }
    mdesc = out.put_bytes(json.dumps(manifest).encode(), manifest["mediaType"])
    out.tag(mdesc, "t1")
    out.tag(mdesc, "t1")  # re-tagging replaces, not duplicates
    image = out.resolve("t1")
    assert image.diff_ids() == [layer.digest] == [digest_of(b"layer bytes")]
    assert image.open_blob(image.layers[0]).read() == b"layer bytes"
    assert len(json.loads((tmp_path / "w/index.json").read_text())["manifests"]) == 1
