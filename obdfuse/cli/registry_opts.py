"""Click options shared by commands that talk to a registry (push, mount)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from obdfuse.cli.params import SIZE

F = Callable[..., Any]


def registry_options(fn: F) -> F:
    """--creds, --plain-http, --platform."""
    fn = click.option("--platform", default="linux/amd64", show_default=True,
                      help="Platform to pick from an image index (os/arch[/variant]).")(fn)
    fn = click.option("--plain-http", is_flag=True, default=None,
                      help="Use plain HTTP (default: only for loopback registries).")(fn)
    fn = click.option("--creds", metavar="USER:PASS", envvar="OBDFUSE_CREDS",
                      help="Registry credentials (default: ~/.docker/config.json).")(fn)
    return fn


def cache_options(fn: F, *, with_cache_dir: bool = True) -> F:
    """--cache-dir, --cache-size, --chunk-size, --background-fetch, --on-registry-error."""
    fn = click.option("--registry-timeout", type=float, default=30.0, show_default=True,
                      help="Seconds before a registry read fails (with --on-registry-error "
                      "fail).")(fn)
    fn = click.option("--on-registry-error", type=click.Choice(["fail", "wait"]),
                      default="fail", show_default=True,
                      help="When the registry is unreachable: fail reads (EIO) after the "
                      "timeout, or wait until it returns.")(fn)
    fn = click.option("--background-rate", type=SIZE, default="50M", show_default=True,
                      help="Bandwidth cap of --background-fetch, bytes per second.")(fn)
    fn = click.option("--background-fetch", is_flag=True,
                      help="Download the rest of every layer in the background.")(fn)
    fn = click.option("--chunk-size", type=SIZE, default="1M", show_default=True,
                      help="Cache fill granularity.")(fn)
    fn = click.option("--cache-size", type=SIZE, default=None,
                      help="Cap of the on-disk cache (LRU eviction); default unbounded.")(fn)
    if with_cache_dir:
        fn = click.option("--cache-dir", type=click.Path(path_type=Path),
                          default="/var/cache/obdfuse", show_default=True,
                          help="Persistent cache of remote blobs.")(fn)
    return fn


def remote_cache_options(fn: F) -> F:
    """`cache_options` without --cache-dir (for commands that already define it)."""
    return cache_options(fn, with_cache_dir=False)


def remote_options_from(kw: dict[str, Any]):
    """Build RemoteOptions from the values of the options above (popped from kw)."""
    from obdfuse.registry.blob import OutagePolicy
    from obdfuse.registry.manifest import Platform
    from obdfuse.registry.session import RegistryOptions
    from obdfuse.remote_image import RemoteOptions

    registry = RegistryOptions(
        creds=kw.pop("creds", None),
        plain_http=kw.pop("plain_http", None),
        platform=Platform.parse(kw.pop("platform", "linux/amd64")),
        policy=OutagePolicy(kw.pop("on_registry_error", "fail"),
                            kw.pop("registry_timeout", 30.0)),
    )
    return RemoteOptions(
        registry=registry,
        cache_dir=kw.pop("cache_dir", None) or Path("/var/cache/obdfuse"),
        cache_size=kw.pop("cache_size", None),
        chunk_size=kw.pop("chunk_size", 1 << 20),
        background_fetch=kw.pop("background_fetch", False),
        background_rate=kw.pop("background_rate", 50 << 20),
    )
