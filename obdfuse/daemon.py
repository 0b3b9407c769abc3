"""Process life of a mount: one trio nursery, readiness, signals, daemonizing.

`serve` opens the device, mounts `ImageFS` and runs the pyfuse3 main loop in
one nursery (later: iSCSI server, prefetch, background fill beside it). It
reports readiness only once the mount answers requests, and on SIGTERM/SIGINT
flushes the device, unmounts and returns. `run` wraps it into an exit code;
`daemonize` forks so that `obdfuse mount` returns exactly when the mount is
live (or fails with the daemon's one-line reason). No business logic here.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import signal
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import pyfuse3
import trio

from obdfuse import runstate
from obdfuse.device import BlockDevice
from obdfuse.errors import ObdfuseError
from obdfuse.fs import IMAGE_NAME, ImageFS
from obdfuse.mountpoint import FSTYPE, check_fuse_device, check_mountpoint, fuse_unmount, mounts
from obdfuse.sd_notify import sd_notify

log = logging.getLogger("obdfuse.daemon")

DeviceOpener = Callable[[], Awaitable[BlockDevice]]

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
JOURNAL_LOG_FORMAT = "%(levelname)s %(name)s: %(message)s"  # journald adds time and pid


def setup_logging(level: str) -> None:
    """Log one line per event to stderr; under journald, without our own timestamp."""
    fmt = JOURNAL_LOG_FORMAT if os.environ.get("JOURNAL_STREAM") else LOG_FORMAT
    logging.basicConfig(level=level.upper(), format=fmt, stream=sys.stderr, force=True)
    if level.upper() != "DEBUG":
        logging.getLogger("pyfuse3").setLevel(logging.WARNING)


@dataclass
class MountSettings:
    """How to serve one image at one mount point."""

    mountpoint: Path
    image: str  # what was mounted, for logs, the stat file and the mount record
    max_tasks: int = 16  # FUSE requests handled concurrently
    readahead_kb: int | None = 4096  # kernel readahead on the FUSE file (None: kernel default)
    ready_timeout: float = 60.0
    log_file: str | None = None
    fuse_device: str = "/dev/fuse"
    extra_options: frozenset[str] = field(default_factory=frozenset)
    #: Tasks run beside the FUSE loop once the mount is live (iSCSI target,
    #: prefetch, background fill); cancelled when the mount stops.
    services: list[Callable[[BlockDevice], Awaitable[None]]] = field(default_factory=list)
    #: Extra fields for `.obdfuse-stat` (see ImageFS.stat_providers).
    stat_providers: list[Callable[[], dict[str, Any]]] = field(default_factory=list)

    def fuse_options(self) -> set[str]:
        options = set(pyfuse3.default_options) | {"fsname=obdfuse", "subtype=obdfuse"}
        if os.geteuid() == 0:
            options.add("allow_other")  # the image may be loop-mounted for anyone
        return options | set(self.extra_options)


class Readiness(Protocol):
    """Where `serve` reports that the mount is live, or why it never will be."""

    is_ready: bool

    def ready(self) -> None: ...

    def failed(self, message: str) -> None: ...


class StderrReadiness:
    """Foreground: failures before readiness are the command's one-line error."""

    def __init__(self) -> None:
        self.is_ready = False

    def ready(self) -> None:
        self.is_ready = True

    def failed(self, message: str) -> None:
        print(f"obdfuse: error: {message}", file=sys.stderr, flush=True)


class PipeReadiness:
    """Background: one line to the waiting parent, `READY` or `ERROR <reason>`."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self.is_ready = False

    def ready(self) -> None:
        self.is_ready = True
        self._send("READY")

    def failed(self, message: str) -> None:
        log.error("%s", message)
        self._send(f"ERROR {message}")

    def _send(self, line: str) -> None:
        if self._fd < 0:
            return
        try:
            os.write(self._fd, (line.replace("\n", " ") + "\n").encode())
        except OSError:
            pass  # the parent gave up waiting
        finally:
            os.close(self._fd)
            self._fd = -1


@contextlib.contextmanager
def _captured_stderr() -> Iterator[list[str]]:
    """Collect what libfuse and fusermount3 print on fd 2 (their only error channel)."""
    lines: list[str] = []
    saved = os.dup(2)
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield lines
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            lines.extend(line for line in tmp.read().decode(errors="replace").splitlines() if line)


def _mount_fuse(fs: ImageFS, settings: MountSettings) -> None:
    failure: RuntimeError | None = None
    with _captured_stderr() as messages:
        try:
            pyfuse3.init(fs, str(settings.mountpoint), settings.fuse_options())
        except RuntimeError as exc:
            failure = exc
    if failure is not None:
        reason = messages[-1] if messages else str(failure)
        raise ObdfuseError(f"cannot mount {settings.mountpoint}: {reason}")
    for line in messages:
        log.warning("libfuse: %s", line)


def _set_readahead(mountpoint: Path, kilobytes: int) -> None:
    """Raise the kernel readahead of the FUSE mount (it caps read request sizes)."""
    dev = os.stat(mountpoint).st_dev
    path = Path(f"/sys/class/bdi/{os.major(dev)}:{os.minor(dev)}/read_ahead_kb")
    try:
        path.write_text(str(kilobytes))
    except OSError as exc:
        log.warning("cannot set readahead to %d KiB (%s): %s", kilobytes, path, exc)


async def _wait_until_live(fs: ImageFS, settings: MountSettings) -> None:
    """Return once the kernel has completed INIT and a stat of `image` is answered."""
    try:
        with trio.fail_after(settings.ready_timeout):
            await fs.ready.wait()
            image = settings.mountpoint / IMAGE_NAME.decode()
            await trio.to_thread.run_sync(os.stat, image, abandon_on_cancel=True)
    except trio.TooSlowError:
        raise ObdfuseError(
            f"the mount at {settings.mountpoint} did not answer within {settings.ready_timeout} s"
        ) from None


@dataclass
class _Shutdown:
    requested_by: str | None = None  # the signal name, when we unmount ourselves
    flush_timed_out: bool = False  # the signal's flush gave up: do not wait for it again


async def _run_fuse_loop(settings: MountSettings, done: trio.CancelScope) -> None:
    await pyfuse3.main(min_tasks=1, max_tasks=settings.max_tasks)
    done.cancel()


FLUSH_TIMEOUT = 120.0  # seconds a flush at shutdown may take


async def _flush(device: BlockDevice) -> None:
    if not device.read_only:
        try:
            with trio.fail_after(FLUSH_TIMEOUT):
                await device.flush()
        except trio.TooSlowError:
            raise ObdfuseError(
                f"the flush did not finish within {FLUSH_TIMEOUT:g} s; unmounted without it"
            ) from None


async def _await_stop_signal(
    signals: trio.abc.ReceiveChannel[int] | object,
    fs: ImageFS,
    shutdown: _Shutdown,
) -> None:
    async for signum in signals:  # type: ignore[attr-defined]
        shutdown.requested_by = signal.Signals(signum).name
        log.info("%s: flushing and unmounting", shutdown.requested_by)
        sd_notify("STOPPING=1")
        if fs.open_handles:
            log.warning(
                "image is still open (%d handles, a loop device?); it will fail with "
                "I/O errors once unmounted",
                fs.open_handles,
            )
        try:
            await _flush(fs.device)
        except ObdfuseError:
            shutdown.flush_timed_out = True
            raise
        pyfuse3.terminate()
        return


async def _open_unless_signalled(open_device: DeviceOpener, signals: object) -> BlockDevice:
    """Open the device; a SIGTERM/SIGINT meanwhile (a registry that does not answer) aborts."""
    stopped_by: list[str] = []
    device: BlockDevice | None = None
    failure: Exception | None = None
    async with trio.open_nursery() as nursery:

        async def watch() -> None:
            async for signum in signals:  # type: ignore[attr-defined]
                stopped_by.append(signal.Signals(signum).name)
                nursery.cancel_scope.cancel()
                return

        nursery.start_soon(watch)
        try:
            device = await open_device()
        except Exception as exc:  # raised as itself, not wrapped in an ExceptionGroup
            failure = exc
        nursery.cancel_scope.cancel()
    if failure is not None:
        raise failure
    if stopped_by or device is None:
        if device is not None:  # the signal came just as the open finished
            await device.aclose()
        raise ObdfuseError(f"stopped by {stopped_by[0]} while opening the image")
    return device


async def serve(open_device: DeviceOpener, settings: MountSettings, readiness: Readiness) -> None:
    """Mount, report readiness, serve until unmounted or signalled, flush, clean up."""
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        check_fuse_device(settings.fuse_device)
        settings.mountpoint = check_mountpoint(settings.mountpoint)
        device = await _open_unless_signalled(open_device, signals)
        try:
            fs = ImageFS(device, image_name=settings.image)
            fs.stat_providers.extend(settings.stat_providers)
            _add_remote_stats(fs)
            _mount_fuse(fs, settings)
            await _serve_mounted(fs, settings, readiness, signals)
        finally:
            await device.aclose()


def _add_remote_stats(fs: ImageFS) -> None:
    """Publish lazy-fetch statistics in the stat file when the image is remote."""
    remote = sys.modules.get("obdfuse.remote_image")  # only imported for image references
    if remote is not None and remote.OPEN_IMAGES:
        fs.stat_providers.append(remote.remote_stats)


async def _serve_mounted(
    fs: ImageFS, settings: MountSettings, readiness: Readiness, signals: object
) -> None:
    shutdown = _Shutdown()
    record: runstate.MountRecord | None = None
    unmount = True
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_run_fuse_loop, settings, nursery.cancel_scope)
            await _wait_until_live(fs, settings)
            if settings.readahead_kb:
                _set_readahead(settings.mountpoint, settings.readahead_kb)
            record = runstate.MountRecord.for_this_process(
                str(settings.mountpoint), settings.image, settings.log_file
            )
            runstate.write_record(record)
            mode = "read-only" if fs.device.read_only else "read-write"
            log.info(
                "mounted %s at %s (%d bytes, %s, pid %d)",
                settings.image, settings.mountpoint, fs.device.size, mode, os.getpid(),
            )
            sd_notify("READY=1", f"STATUS=serving {settings.image} at {settings.mountpoint}")
            readiness.ready()
            nursery.start_soon(_await_stop_signal, signals, fs, shutdown)
            for service in settings.services:
                nursery.start_soon(service, fs.device)
        unmount = shutdown.requested_by is not None
        if not unmount:
            log.info("%s was unmounted; flushing and exiting", settings.mountpoint)
            sd_notify("STOPPING=1")
    finally:
        try:
            if not shutdown.flush_timed_out:  # one flush deadline, not two, before unmount
                with trio.CancelScope(shield=True):
                    await _flush(fs.device)
        finally:
            pyfuse3.close(unmount=unmount)
            if record is not None:
                runstate.remove_record(record)
    log.info("stopped cleanly")


def run(open_device: DeviceOpener, settings: MountSettings, readiness: Readiness) -> int:
    """Run `serve` to completion; the process exit code (errors become one line)."""
    from obdfuse.cli import describe_error  # late: the CLI package imports this module

    try:
        trio.run(serve, open_device, settings, readiness)
    except Exception as raised:
        exc = _single_cause(raised)
        if isinstance(exc, ObdfuseError | OSError):
            message = describe_error(exc)
        else:
            log.error("mount daemon failed", exc_info=raised)
            message = f"internal error: {type(exc).__name__}: {exc}"
    else:
        return 0
    if readiness.is_ready:
        log.error("%s", message)
    else:
        readiness.failed(message)
    return 1


def _single_cause(exc: Exception) -> Exception:
    """The one exception inside (nested) single-member exception groups, else `exc`."""
    while isinstance(exc, ExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


EXIT_TIMEOUT = 30.0  # how long a failed daemon may take to clean up before it is killed


def daemonize(
    child: Callable[[Readiness], int],
    *,
    log_file: Path,
    timeout: float,
    exit_timeout: float = EXIT_TIMEOUT,
    mountpoint: Path | None = None,
) -> int:
    """Fork a session-leader daemon running `child`; return its pid once it is ready.

    The daemon's stdin is /dev/null and its stdout/stderr go to `log_file`, so
    whoever ran `obdfuse mount` gets its terminal (and pipes) back. Raises
    ObdfuseError with the daemon's reason if it fails or is not ready in time; a
    failed daemon gets `exit_timeout` seconds to exit before it is killed, and a mount
    it leaves at `mountpoint` is detached: a failed command leaves nothing mounted.
    """
    log_file.parent.mkdir(parents=True, exist_ok=True)
    log_fd = os.open(log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o640)
    read_end, write_end = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the daemon
        code = 1
        try:
            os.close(read_end)
            os.setsid()
            os.chdir("/")  # keep no directory busy; the CLI passes absolute paths
            signal.signal(signal.SIGHUP, signal.SIG_IGN)  # no terminal to hang up any more
            devnull = os.open(os.devnull, os.O_RDWR)
            os.dup2(devnull, 0)
            os.dup2(log_fd, 1)
            os.dup2(log_fd, 2)
            code = child(PipeReadiness(write_end))
        finally:
            os._exit(code)
    os.close(write_end)
    os.close(log_fd)
    try:
        line = _read_line(read_end, timeout)
    finally:
        os.close(read_end)
    if line == "READY":
        return pid
    if line.startswith("ERROR "):
        killed = _reap_or_kill(pid, exit_timeout) is None
        raise ObdfuseError(line[len("ERROR ") :] + _killed_note(pid, killed, exit_timeout))
    if line == "":
        status = _reap_or_kill(pid, exit_timeout)
        how = "closed its pipe" if status is None else f"exited (status {status})"
        raise ObdfuseError(
            f"the mount daemon {how} before the mount was ready; see {log_file}"
            + _killed_note(pid, status is None, exit_timeout)
        )
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    killed = _reap_or_kill(pid, exit_timeout) is None
    how = f"killed it after {exit_timeout:g} s more" if killed else "stopped it"
    if mountpoint is not None and _detach_stale_mount(mountpoint):
        how += f" and detached its mount at {mountpoint}"
    raise ObdfuseError(
        f"the mount daemon (pid {pid}) was not ready within {timeout:g} s; {how}; see {log_file}"
    )


def _detach_stale_mount(mountpoint: Path) -> bool:
    """Lazily unmount an obdfuse mount left at `mountpoint` by a killed daemon."""
    path = os.path.abspath(mountpoint)
    if mounts().get(path) != FSTYPE:
        return False
    try:
        fuse_unmount(path, lazy=True)
    except ObdfuseError as exc:
        log.warning("%s", exc)
        return False
    return True


def _wait_exit(pid: int, timeout: float) -> int | None:
    """Reap child `pid` within `timeout` seconds: its wait status, or None if it still runs."""
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.02)


def _reap_or_kill(pid: int, timeout: float) -> int | None:
    """Wait for child `pid` to exit; after `timeout` s SIGKILL and reap it. Its wait
    status, or None if it had to be killed."""
    status = _wait_exit(pid, timeout)
    if status is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        _wait_exit(pid, 10.0)  # a process in uninterruptible sleep may take a moment
    return status


def _killed_note(pid: int, killed: bool, timeout: float) -> str:
    if not killed:
        return ""
    return f" (the daemon, pid {pid}, did not exit within {timeout:g} s; killed it)"


def _read_line(fd: int, timeout: float) -> str:
    """The first line written to `fd`, "" on EOF, "TIMEOUT" after `timeout` seconds."""
    data = b""
    deadline = time.monotonic() + timeout
    while b"\n" not in data:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            return "TIMEOUT"
        chunk = os.read(fd, 4096)
        if not chunk:
            return ""
        data += chunk
    return data.split(b"\n", 1)[0].decode(errors="replace")
