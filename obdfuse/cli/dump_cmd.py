"""`obdfuse dump IMAGE OUT`: write an image's merged virtual disk as a sparse raw file."""

from __future__ import annotations

from pathlib import Path

import click
import trio


@click.command()
@click.argument("image")
@click.argument("out", type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--upper",
    type=click.Path(file_okay=False, path_type=Path),
    help="Directory of a writable layer (data + index) stacked on top.",
)
def dump(image: str, out: Path, upper: Path | None) -> None:
    """Write IMAGE (config.v1.json or layer file) to OUT as a sparse raw disk."""
    from obdfuse.image import open_image
    from obdfuse.layers.dump import dump_image

    async def run() -> tuple[int, int]:
        stack = await open_image(image, upper=upper, read_only=True)
        try:
            return stack.size, await dump_image(stack, out)
        finally:
            await stack.aclose()

    size, written = trio.run(run)
    click.echo(f"{out}: {size} bytes, {written} bytes of data", err=True)
