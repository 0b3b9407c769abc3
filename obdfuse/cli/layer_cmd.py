"""`obdfuse layer ...`: create and commit writable layers, describe layer files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import click
import trio

from obdfuse.cli.params import SIZE

if TYPE_CHECKING:
    from obdfuse.layers.header import LsmtHeader

_PATH = click.Path(dir_okay=False, path_type=Path)


@click.group()
def layer() -> None:
    """LSMT layers: create writable layers, commit them, inspect layer files."""


@layer.command()
@click.option("--sparse", is_flag=True, help="Sparse mode: the data file is the disk.")
@click.option("--uuid", help="UUID of the new layer (default: random).")
@click.option("--parent-uuid", help="UUID of the layer below.")
@click.argument("data", type=_PATH)
@click.argument("index", type=_PATH)
@click.argument("size", type=SIZE)
def create(
    sparse: bool, uuid: str | None, parent_uuid: str | None, data: Path, index: Path, size: int
) -> None:
    """Create an empty writable layer (DATA + INDEX) of virtual SIZE (e.g. 64G)."""
    from obdfuse.layers.writable import WritableLayer

    _check_uuid(uuid, "--uuid")
    _check_uuid(parent_uuid, "--parent-uuid")
    if size <= 0 or size % 512:
        raise click.BadParameter("must be a positive multiple of 512 bytes", param_hint="SIZE")
    WritableLayer.create(
        data, index, size, uuid=uuid, parent_uuid=parent_uuid, sparse=sparse
    ).close()


@layer.command()
@click.option("--zfile", "-z", "use_zfile", is_flag=True, help="Compress the layer as a ZFile.")
@click.option("--algorithm", type=click.Choice(["lz4", "zstd"]), default="lz4", show_default=True)
@click.option(
    "--block-size",
    type=SIZE,
    default="4K",
    show_default=True,
    help="ZFile block size (4K..64K, a power of two).",
)
@click.option("--tar", "-t", "use_tar", is_flag=True, help="Wrap the result in a tar.")
@click.option("--uuid", help="UUID of the committed layer (default: the null UUID).")
@click.option("--parent-uuid", help="Parent UUID (default: the writable layer's parent).")
@click.option("-m", "--message", default="", help="Commit message (user tag, ≤ 256 bytes).")
@click.option("--force", "-f", is_flag=True, help="Replace OUT if it exists.")
@click.argument("paths", nargs=-1, required=True, metavar="(UPPER_DIR | DATA INDEX) OUT",
                type=click.Path(path_type=Path))
def commit(
    use_zfile: bool,
    algorithm: str,
    block_size: int,
    use_tar: bool,
    uuid: str | None,
    parent_uuid: str | None,
    message: str,
    force: bool,
    paths: tuple[Path, ...],
) -> None:
    """Commit a writable layer into a sealed layer OUT.

    The writable layer is either UPPER_DIR (the `--upper` folder of a mount,
    holding `data` and `index`) or the two files DATA and INDEX.
    """
    data, index, out = _commit_sources(paths)
    if out.exists() and not force:
        raise click.ClickException(f"{out} exists (use --force to replace it)")
    from obdfuse.layers.commit import CommitOptions, commit_layer
    from obdfuse.layers.writable import WritableLayer

    _check_uuid(uuid, "--uuid")
    _check_uuid(parent_uuid, "--parent-uuid")
    if use_zfile and (block_size < 4096 or block_size > 65536 or block_size & (block_size - 1)):
        raise click.BadParameter("must be a power of two from 4K to 64K", param_hint="--block-size")
    tag = message.encode()
    if len(tag) > 256:
        raise click.BadParameter("longer than 256 bytes", param_hint="--message")
    options = CommitOptions(
        uuid=uuid,
        parent_uuid=parent_uuid,
        user_tag=tag,
        zfile=use_zfile,
        algorithm=algorithm,
        block_size=block_size,
        tar=use_tar,
    )
    src = WritableLayer.open(data, index, read_only=True)
    try:
        size = trio.run(commit_layer, src, out, options)
    finally:
        src.close()
    click.echo(f"{out}: {size} bytes", err=True)


@layer.command()
@click.option(
    "--compress/--no-compress",
    default=True,
    show_default=True,
    help="ZFile (LZ4, 4K) output, as overlaybd-merge.",
)
@click.option("--tar", "-t", "use_tar", is_flag=True, help="Wrap the result in a tar.")
@click.option("--force", "-f", is_flag=True, help="Replace OUT if it exists.")
@click.argument("image")
@click.argument("out", type=_PATH)
def merge(compress: bool, use_tar: bool, force: bool, image: str, out: Path) -> None:
    """Flatten every layer of IMAGE (config.v1.json or layer) into one layer OUT.

    Like overlaybd-merge: null uuid, the bottom layer's parent, entries tagged with
    the level they came from (0 = top).
    """
    from obdfuse.image import open_image
    from obdfuse.layers.commit import CommitOptions, commit_layer

    if out.exists() and not force:
        raise click.ClickException(f"{out} exists (use --force to replace it)")
    options = CommitOptions(zfile=compress, tar=use_tar, overwrite_header=False)

    async def run() -> int:
        stack = await open_image(image, read_only=True)
        try:
            return await commit_layer(stack, out, options)
        finally:
            await stack.aclose()

    size = trio.run(run)
    click.echo(f"{out}: {size} bytes", err=True)


@layer.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
def info(as_json: bool, file: Path) -> None:
    """Describe a layer file: header fields, segments, mapped bytes, wrapping."""
    facts = trio.run(describe_layer_file, file)
    if as_json:
        click.echo(json.dumps(facts, indent=2))
        return
    for key, value in facts.items():
        click.echo(f"{key:16} {value}")


async def describe_layer_file(path: Path) -> dict:
    """Facts about a sealed layer, or about a writable layer's data/index file."""
    from obdfuse.image import open_layer_file
    from obdfuse.layers.header import FLAG_SEALED, SLOT_SIZE, LsmtHeader, is_lsmt

    with open(path, "rb") as f:
        head = f.read(SLOT_SIZE)
    if is_lsmt(head):
        hdr = LsmtHeader.unpack(head, f"{path}: header")
        if not hdr.flags & FLAG_SEALED and not _has_sealed_trailer(path):
            return {"file": str(path), "kind": _rw_kind(hdr), **_header_facts(hdr)}
    layer = await open_layer_file(path)  # closes the file itself if opening fails
    try:
        segs = layer.segments
        return {
            "file": str(path),
            "kind": "sealed layer",
            "wrapping": "+".join(layer.wrapping) or "none",
            "lsmt_size": layer.blob.size,
            **_header_facts(layer.trailer),
            "header_flags": f"{layer.header.flags:#x}",
            "segments": len(segs),
            "zeroed_segments": int(segs.zeroed.sum()),
            "mapped_bytes": layer.index.data_sectors() * 512,
        }
    finally:
        await layer.aclose()


def _has_sealed_trailer(path: Path) -> bool:
    from obdfuse.layers.header import SLOT_SIZE, is_lsmt

    with open(path, "rb") as f:
        size = f.seek(0, 2)
        if size < 2 * SLOT_SIZE:
            return False
        f.seek(size - SLOT_SIZE)
        return is_lsmt(f.read(64))


def _rw_kind(hdr: LsmtHeader) -> str:
    if hdr.is_data:
        return "writable layer data file" + (" (sparse)" if hdr.is_sparse else "")
    return "writable layer index file"


def _header_facts(hdr: LsmtHeader) -> dict[str, object]:
    return {
        "flags": f"{hdr.flags:#x}",
        "uuid": hdr.uuid,
        "parent_uuid": hdr.parent_uuid,
        "virtual_size": hdr.virtual_size,
        "index_offset": hdr.index_offset,
        "index_size": hdr.index_size,
        "version": f"{hdr.version}.{hdr.sub_version}",
        "user_tag": hdr.user_tag.decode("utf-8", "replace"),
    }


def _check_uuid(value: str | None, hint: str) -> None:
    from obdfuse.layers.header import normalize_uuid

    if value:
        try:
            normalize_uuid(value)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint=hint) from None


def _commit_sources(paths: tuple[Path, ...]) -> tuple[Path, Path, Path]:
    """(data, index, out) from `UPPER_DIR OUT` or `DATA INDEX OUT`."""
    if len(paths) == 2:
        upper, out = paths
        if not upper.is_dir():
            raise click.BadParameter(f"{upper} is not a directory holding data and index",
                                     param_hint="UPPER_DIR")
        data, index = upper / "data", upper / "index"
    elif len(paths) == 3:
        data, index, out = paths
    else:
        raise click.UsageError("expected UPPER_DIR OUT or DATA INDEX OUT")
    if not data.is_file():
        raise click.BadParameter(f"{data} does not exist", param_hint="DATA")
    return data, index, out
