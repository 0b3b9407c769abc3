"""`obdfuse stat MOUNTPOINT`: the daemon's statistics as JSON (incl. lazy-fetch numbers)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from obdfuse.errors import ObdfuseError
from obdfuse.fs import STAT_NAME

STAT_FILE = STAT_NAME.decode()  # the hidden control file the FUSE layer serves


def read_stats(mountpoint: Path) -> dict:
    """The stat document of the daemon serving `mountpoint`."""
    path = mountpoint / STAT_FILE
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ObdfuseError(f"{mountpoint}: not an obdfuse mount point") from None
    try:
        return json.loads(text)
    except ValueError as exc:
        raise ObdfuseError(f"{path}: malformed statistics ({exc})") from None


def summarize(stats: dict) -> dict:
    """Totals over the remote layers: fetched vs. size, requests, hits."""
    layers = [layer for image in stats.get("remote", []) for layer in image.get("layers", [])]
    size = sum(layer.get("size", 0) for layer in layers)
    fetched = sum(layer.get("bytes_fetched", 0) for layer in layers)
    return {
        "layers": len(layers),
        "image_bytes": size,
        "bytes_fetched": fetched,
        "fetched_fraction": round(fetched / size, 6) if size else 0.0,
        "requests": sum(layer.get("requests", 0) for layer in layers),
        "cache_hits": sum(layer.get("cache_hits", 0) for layer in layers),
        "cache_misses": sum(layer.get("cache_misses", 0) for layer in layers),
    }


@click.command("stat")
@click.argument("mountpoint", type=click.Path(path_type=Path, file_okay=False))
@click.option("--summary", is_flag=True, help="Only totals over the remote layers.")
def stat(mountpoint: Path, summary: bool) -> None:
    """Print statistics of the image mounted at MOUNTPOINT as JSON.

    For registry images: bytes fetched, requests and cache hits per layer.
    """
    stats = read_stats(mountpoint)
    if summary:
        stats = summarize(stats)
    elif stats.get("remote"):
        stats["remote_summary"] = summarize(stats)
    click.echo(json.dumps(stats, indent=2, sort_keys=True))
