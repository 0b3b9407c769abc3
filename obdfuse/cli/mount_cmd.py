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
from obdfuse.cli.iscsi_opts import iscsi_export_options, iscsi_service_from
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
from obdfuse.fs import IMAGE_NAME, STAT_NAME
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
@iscsi_export_options
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
@click.option("--record-trace", type=click.Path(path_type=Path), metavar="PATH",
              help="Record the reads of the image's layers into PATH (overlaybd trace "
              "format) until PATH.lock is deleted or the image is unmounted.")
@click.option("--replay-trace", type=click.Path(path_type=Path), metavar="PATH",
              help="Prefetch what a trace (or a prefetch list of paths) names, in the "
              "background, once mounted.")
@click.option("--prefetch-concurrency", type=click.IntRange(1, 256), default=16,
              show_default=True, help="Parallel requests of --replay-trace.")
@click.option("--prefetch-window", type=SIZE, default="128M", show_default=True,
              help="Most bytes a trace replay keeps in flight to the registry.")
@click.option("--prefetch-request-size", type=SIZE, default="8M", hidden=True,
              help="Largest range request a trace replay merges neighbouring chunks into.")
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
    record_trace: Path | None = None,
    replay_trace: Path | None = None,
    prefetch_concurrency: int = 16,
    prefetch_request_size: int = 8 << 20,
    prefetch_window: int = 128 << 20,
    iscsi_listen: str | None = None,
    iscsi_iqn: str | None = None,
    iscsi_chap: str | None = None,
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
    iscsi_service = iscsi_service_from(iscsi_listen, iscsi_iqn, iscsi_chap)

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

    trace = _trace_service(image, mountpoint, raw, record_trace, replay_trace,
                           concurrency=prefetch_concurrency, max_request=prefetch_request_size,
                           window=prefetch_window)

    async def open_device() -> BlockDevice:
        if raw:
            return RawFileDevice(image, read_only=raw == "ro")
        from obdfuse.image import open_image

        device = await open_image(image, upper=upper, size=size, cache_dir=cache_dir,
                                  remote=remote)
        if trace is not None:
            try:
                trace.attach(device)  # a recording starts with the image: no read is missed
            except BaseException:
                await device.aclose()
                raise
        return device

    settings = MountSettings(
        mountpoint=mountpoint,
        image=image,
        max_tasks=max_tasks,
        readahead_kb=readahead_kb or None,
        ready_timeout=timeout,
        log_file=None if foreground else str(log_path),
    )
    if iscsi_service is not None:
        settings.services.append(iscsi_service)
    if trace is not None:
        settings.services.append(trace.run)
        settings.stat_providers.append(trace.stats)

    def serve(readiness: Readiness) -> int:
        setup_logging(log_level)
        return run(open_device, settings, readiness)

    if foreground:
        raise SystemExit(serve(StderrReadiness()))
    daemonize(serve, log_file=log_path, timeout=timeout, mountpoint=mountpoint)


def _trace_service(image: str, mountpoint: Path, raw: str | None, record: Path | None,
                   replay: Path | None, **tuning: int):
    """The trace mode of this mount (options, else the config's keys), checked now."""
    from obdfuse.trace.session import TraceService, TraceSettings

    if record and replay:
        raise click.UsageError("--record-trace and --replay-trace exclude each other")
    if raw and (record or replay):
        raise click.UsageError("--raw images have no layers to trace")
    if record:
        settings = TraceSettings.for_record(record, **tuning)
    elif replay:
        settings = TraceSettings.for_replay(replay, **tuning)
    elif not raw and _is_config_file(image):
        from obdfuse.layers.config import load_config

        settings = TraceSettings.from_config(load_config(image), **tuning)
    else:
        return None
    if not settings.enabled:
        return None
    return TraceService(settings, image_file=mountpoint / IMAGE_NAME.decode())


def _is_config_file(image: str) -> bool:
    """A config.v1.json (the file `open_image` would read as a config)."""
    path = Path(image)
    if not path.is_file():
        return False
    if path.suffix == ".json":
        return True
    with open(path, "rb") as fh:
        return fh.read(64).lstrip()[:1] == b"{"


@click.command()
@click.option("--timeout", type=float, default=60.0, show_default=True,
              help="Seconds to wait for the unmount, and for the daemon to flush and exit.")
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
        fuse_unmount(mountpoint, lazy=lazy, timeout=timeout)
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
