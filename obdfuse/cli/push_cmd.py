"""`obdfuse push IMAGE... REF`: upload local overlaybd layers as a registry image."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click
import trio

from obdfuse.cli.params import SIZE
from obdfuse.cli.registry_opts import registry_options
from obdfuse.errors import FormatError

# spec §5.3: where a `dir` lower keeps its sealed layer, in lookup order
DIR_CANDIDATES = ("overlaybd.commit", ".commit", "overlaybd.sealed")


def layers_of(image: Path) -> list[Path]:
    """The sealed layer files of a config.v1.json (bottom first), or [image] for a layer."""
    if image.suffix != ".json":
        if not image.is_file():
            raise FormatError(f"{image}: no such layer file")
        return [image]
    try:
        doc = json.loads(image.read_text())
    except ValueError as exc:
        raise FormatError(f"{image}: not JSON ({exc})") from None
    lowers = doc.get("lowers") if isinstance(doc, dict) else None
    if not isinstance(lowers, list) or not lowers:
        raise FormatError(f"{image}: no lowers to push")
    paths = []
    for i, lower in enumerate(lowers):
        found = None
        if isinstance(lower, dict) and lower.get("file"):
            found = image.parent / lower["file"]
        elif isinstance(lower, dict) and lower.get("dir"):
            d = image.parent / lower["dir"]
            found = next((d / n for n in DIR_CANDIDATES if (d / n).is_file()), None)
        if found is None or not found.is_file():
            raise FormatError(f"{image}: lower {i} has no local layer file to push")
        paths.append(found)
    return paths


@click.command("push")
@click.argument("images", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.argument("ref")
@registry_options
@click.option("--oci", is_flag=True, help="OCI media types (default: Docker schema 2).")
@click.option("--fs-type", default="ext4", show_default=True,
              help="Filesystem annotation of the layers (blob-fs-type).")
@click.option("--chunk-size", type=SIZE, default="32M", show_default=True,
              help="Blobs larger than this are uploaded in chunks.")
@click.option("--timeout", type=float, default=30.0, show_default=True,
              help="Seconds to keep retrying when the registry fails or is unreachable.")
def push(images: tuple[Path, ...], ref: str, creds: str | None, plain_http: bool | None,
         platform: str, oci: bool, fs_type: str, chunk_size: int, timeout: float) -> None:
    """Upload IMAGE (a config.v1.json, or layer files bottom first) to REF.

    Layers keep their bytes (LSMT, ZFile or tar-wrapped) and get the overlaybd
    annotations, so that `obdfuse mount REF` works.
    """
    from obdfuse.registry.blob import OutagePolicy
    from obdfuse.registry.manifest import Platform
    from obdfuse.registry.push import push_layers
    from obdfuse.registry.session import Registry, RegistryOptions

    paths = [p for image in images for p in layers_of(image)]
    options = RegistryOptions(creds=creds, plain_http=plain_http,
                              platform=Platform.parse(platform),
                              policy=OutagePolicy("fail", timeout))
    total = sum(p.stat().st_size for p in paths)
    bar = None
    if sys.stderr.isatty():
        from tqdm import tqdm

        bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, file=sys.stderr,
                   desc="push")

    def progress(_name: str, n: int, _size: int) -> None:
        if bar is not None:
            bar.update(n)

    async def main():
        registry = Registry.open(ref, options)
        try:
            return await push_layers(registry, paths, oci=oci, fs_type=fs_type or None,
                                     chunk_size=chunk_size, progress=progress)
        finally:
            await registry.aclose()

    try:
        pushed = trio.run(main)
    finally:
        if bar is not None:
            bar.close()
    click.echo(pushed.reference)
