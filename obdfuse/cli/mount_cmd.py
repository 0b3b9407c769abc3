"""`obdfuse mount` and `obdfuse umount`: attach an image as MOUNTPOINT/image, detach it."""

from __future__ import annotations

import contextlib
import json
import os
import threading
from pathlib import Path
from typing import Any

import click

from obdfuse import runstate
from obdfuse.cli.params import SIZE
from obdfuse.cli.registry_opts import registry_options, remote_cache_options, remote_options_from
from obdfuse.daemon import (
    MountSettings,
    Readiness,
    StderrReadiness,
    daemonize,
    run,
    setup_logging,
)
from obdfuse.device import BlockDevice, RawFileDevice
from obdfuse.errors import ObdfuseError
from obdfuse.fs import STAT_NAME
from obdfuse.mountpoint import FSTYPE, fuse_unmount, mounts

LOG_LEVELS = ["debug", "info", "warning", "error"]


@click.command()
@click.option("--upper", type=click.Path(path_type=Path), help="Writable layer directory "
              "(DIR/data, DIR/index; created when missing). Without it the image is read-only.")
@click.option("--size", type=SIZE, help="Virtual disk size for a new upper layer with no lowers.")
@click.option("--cache-dir", type=click.Path(path_type=Path),
              help="Persistent cache of remote blobs [default: /var/cache/obdfuse].")
@remote_cache_options
@registry_options
@click.option("--foreground", "-f", is_flag=True,
              help="Stay attached (for a supervisor); logs go to stderr.")
@click.option("--log-level", type=click.Choice(LOG_LEVELS, case_sensitive=False),
              default="info", show_default=True)
@click.option("--log-file", type=click.Path(path_type=Path),
              help="Daemon log in background mode [default: in the run directory].")
@click.option("--timeout", type=float, default=120.0, show_default=True,
              help="Seconds to wait for the mount to become ready.")
@click.option("--raw", type=click.Choice(["ro", "rw"]), hidden=True,
              help="Serve IMAGE as a plain disk image file (testing and benchmarks).")
@click.option("--max-tasks", type=click.IntRange(1, 256), default=16, hidden=True)
@click.option("--readahead-kb", type=click.IntRange(0, 1 << 20), default=4096, hidden=True)
@click.argument("image")
@click.argument("mountpoint", type=click.Path(path_type=Path))
def mount(
    image: str,
    mountpoint: Path,
    upper: Path | None,
    size: int | None,
    cache_dir: Path | None,
    foreground: bool,
    log_level: str,
    log_file: Path | None,
    timeout: float,
    raw: str | None,
    max_tasks: int,
    readahead_kb: int,
    **remote_kw: Any,
) -> None:
    """Expose IMAGE (config.v1.json, layer file or image reference) as MOUNTPOINT/image.

    Returns once the mount is live, leaving a daemon serving it; loop-mount the
    file with `mount -o loop MOUNTPOINT/image DIR` and detach with `obdfuse umount`.
    """
    if raw and (upper or size):
        raise click.UsageError("--raw cannot be combined with --upper/--size")
    if size is not None and upper is None:
        raise click.UsageError("--size sizes a new writable layer: it needs --upper DIR")

    # The daemon runs from /: make local paths absolute (image references stay as they are).
    if os.path.exists(image):
        image = os.path.abspath(image)
    upper = Path(os.path.abspath(upper)) if upper else None
    cache_dir = Path(os.path.abspath(cache_dir)) if cache_dir else None
    mountpoint = Path(os.path.abspath(mountpoint))
    log_path = Path(os.path.abspath(log_file or runstate.default_log_path(mountpoint)))
    # Registry options only matter for image references; local images skip the
    # registry client (and its memory) entirely.
    local = raw is not None or os.path.exists(image)
    remote = None if local else remote_options_from({**remote_kw, "cache_dir": cache_dir})

    async def open_device() -> BlockDevice:
        if raw:
            return RawFileDevice(image, read_only=raw == "ro")
        from obdfuse.image import open_image

        return await open_image(image, upper=upper, size=size, cache_dir=cache_dir,
                                remote=remote)

    settings = MountSettings(
        mountpoint=mountpoint,
        image=image,
        max_tasks=max_tasks,
        readahead_kb=readahead_kb or None,
        ready_timeout=timeout,
        log_file=None if foreground else str(log_path),
    )

    def serve(readiness: Readiness) -> int:
        setup_logging(log_level)
        return run(open_device, settings, readiness)

    if foreground:
        raise SystemExit(serve(StderrReadiness()))
    daemonize(serve, log_file=log_path, timeout=timeout)


@click.command()
@click.option("--timeout", type=float, default=60.0, show_default=True,
              help="Seconds to wait for the daemon to flush and exit.")
@click.option("--lazy", "-l", is_flag=True,
              help="Detach even if the image is still in use (it then fails with I/O errors).")
@click.argument("mountpoint", type=click.Path(path_type=Path))
def umount(mountpoint: Path, timeout: float, lazy: bool) -> None:
    """Unmount MOUNTPOINT and wait until its daemon has flushed and exited."""
    mountpoint = Path(os.path.abspath(mountpoint))
    record = runstate.read_record(mountpoint)
    kind = mounts().get(str(mountpoint))
    if kind is not None and kind != FSTYPE:
        raise ObdfuseError(f"{mountpoint} is not an obdfuse mount ({kind}); not touching it")
    mounted = kind is not None
    if record is None and mounted:  # started with another run directory: ask the mount
        record = _record_from_stat_file(mountpoint)
    daemon_alive = record is not None and record.alive()
    if mounted:
        fuse_unmount(mountpoint, lazy=lazy)
    elif not daemon_alive:
        raise ObdfuseError(f"{mountpoint} is not mounted")
    if record is not None and daemon_alive and not record.wait_exit(timeout):
        where = f"; see {record.log_file}" if record.log_file else ""
        raise ObdfuseError(
            f"unmounted {mountpoint}, but its daemon (pid {record.pid}) did not exit "
            f"within {timeout} s{where}"
        )


def _record_from_stat_file(mountpoint: Path, timeout: float = 5.0) -> runstate.MountRecord | None:
    """The daemon's pid from MOUNTPOINT/.obdfuse-stat (None if it does not answer in time)."""
    found: list[int] = []

    def read() -> None:
        with contextlib.suppress(OSError, ValueError, KeyError):
            found.append(int(json.loads((mountpoint / STAT_NAME.decode()).read_text())["pid"]))

    reader = threading.Thread(target=read, daemon=True)  # a hung mount must not hang us
    reader.start()
    reader.join(timeout)
    if not found:
        return None
    start = runstate.process_start_time(found[0])
    if start is None:
        return None
    return runstate.MountRecord(found[0], start, str(mountpoint), "")
