"""A private work area for building layers, and everything attached under it.

`Workspace` owns a temporary directory plus the FUSE mounts (obdfuse daemons),
loop devices and filesystem mounts made while building layers. Each of them is
registered *before* it is created, so `close()` undoes it even if the creating
command was interrupted half-way; undo steps run in reverse order (filesystem →
loop device → FUSE mount), and they only ever touch what lives inside this
workspace (loop devices are found by their backing file, mounts by their path).
`close()` runs with SIGINT/SIGTERM blocked so a second Ctrl-C cannot abandon a
mount. `signals_raise()` turns SIGTERM/SIGHUP into KeyboardInterrupt so `finally`
blocks run on them too.

Must not: know about image formats.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from obdfuse.convert.launcher import CliLauncher, LauncherUnavailable
from obdfuse.errors import ObdfuseError

log = logging.getLogger(__name__)

_CLEANUP_SIGNALS = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}


class WorkspaceError(ObdfuseError):
    """A mount or device step of a build failed."""


def run_tool(
    cmd: list[str], *, what: str, env: dict[str, str] | None = None, timeout: float | None = 600
) -> str:
    """Run a system tool in its own session (a terminal's Ctrl-C reaches only us)."""
    try:
        proc = subprocess.run(
            cmd,
            capture_output=True,
            text=True,
            env=env,
            timeout=timeout,
            start_new_session=True,
            check=False,
        )
    except FileNotFoundError:
        raise WorkspaceError(f"{what}: {cmd[0]} is not installed") from None
    except subprocess.TimeoutExpired:
        raise WorkspaceError(f"{what}: {cmd[0]} did not finish within {timeout} s") from None
    if proc.returncode != 0:
        detail = (proc.stderr or proc.stdout).strip().splitlines()
        raise WorkspaceError(
            f"{what} failed: {detail[-1] if detail else f'exit {proc.returncode}'}"
        )
    return proc.stdout


def mount_table() -> list[tuple[str, str]]:
    """(mount point, fs type) of this mount namespace (from /proc/self/mountinfo)."""
    found = []
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            head, _, tail = line.partition(" - ")
            fields = head.split(" ")
            if len(fields) > 4:
                found.append((_unescape(fields[4]), tail.split(" ", 1)[0]))
    return found


def mounted_paths() -> set[str]:
    """Mount points of this mount namespace (unescaped)."""
    return {path for path, _ in mount_table()}


def _unescape(text: str) -> str:
    out, i = [], 0
    while i < len(text):
        if text[i] == "\\" and i + 3 < len(text) and text[i + 1 : i + 4].isdigit():
            out.append(chr(int(text[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


def is_mounted(path: Path) -> bool:
    return os.path.abspath(path) in mounted_paths()


def loop_table() -> list[tuple[str, str]]:
    """(/dev/loopN, backing file) of every attached loop device (from sysfs)."""
    found = []
    with contextlib.suppress(FileNotFoundError):
        for name in os.listdir("/sys/block"):
            if not name.startswith("loop"):
                continue
            try:
                text = Path(f"/sys/block/{name}/loop/backing_file").read_text().strip()
            except OSError:
                continue
            found.append((f"/dev/{name}", text.removesuffix(" (deleted)")))
    return found


def loop_devices_of(backing: Path) -> list[str]:
    """Loop devices currently attached to `backing`."""
    want = os.path.realpath(backing)
    return [dev for dev, file in loop_table() if file == want]


@contextlib.contextmanager
def signals_raise() -> Iterator[None]:
    """Within: SIGTERM and SIGHUP raise KeyboardInterrupt like SIGINT does (main thread)."""

    def interrupt(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")

    previous = {}
    for sig in (signal.SIGTERM, signal.SIGHUP):
        try:
            previous[sig] = signal.signal(sig, interrupt)
        except ValueError:  # not the main thread: leave signals alone
            break
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@contextlib.contextmanager
def _signals_deferred() -> Iterator[list[int]]:
    """Within: cleanup signals are only recorded (main thread; elsewhere a no-op)."""
    pending: list[int] = []

    def defer(signum: int, _frame: object) -> None:
        pending.append(signum)

    previous = {}
    for sig in sorted(_CLEANUP_SIGNALS):
        try:
            previous[sig] = signal.signal(sig, defer)
        except ValueError:  # not the main thread
            break
    try:
        yield pending
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


PREFIX = "obdfuse-build-"
OWNER_FILE = "owner"


def _process_start(pid: int) -> str | None:
    """The start time of a process (to tell it from a later one with the same pid)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rpartition(")")[2].split()[19]


def _owner_alive(work: Path) -> bool:
    try:
        pid_text, start = (work / OWNER_FILE).read_text().split()
    except (OSError, ValueError):
        # no owner record: too new to have one, or not ours; leave young ones alone
        try:
            return time.time() - work.stat().st_mtime < 60
        except OSError:
            return False
    return _process_start(int(pid_text)) == start


def reap_stale(parent: Path) -> list[Path]:
    """Tear down work areas under `parent` whose process died (kill -9, power loss).

    Their filesystem mounts, loop devices and obdfuse mounts are undone exactly as
    `Workspace.close()` would; returns the work areas removed.
    """
    reaped = []
    try:
        candidates = [p for p in parent.iterdir() if p.name.startswith(PREFIX) and p.is_dir()]
    except FileNotFoundError:
        return reaped
    for work in candidates:
        if _owner_alive(work):
            continue
        log.warning("cleaning up %s, left behind by a process that died", work)
        stale = Workspace.adopt(work)
        root = str(work.resolve()) + "/"
        table = [(p, t) for p, t in mount_table() if p.startswith(root)]
        for path, _ in (m for m in table if m[1].startswith("fuse")):
            stale._push(f"fuse:{path}", functools.partial(stale._fuse_unmount, Path(path)))
        for backing in {file for _, file in loop_table() if file.startswith(root)}:
            stale._push(f"loop:{backing}", functools.partial(stale._loop_detach_all, Path(backing)))
        for path, _ in sorted(
            (m for m in table if not m[1].startswith("fuse")), key=lambda m: len(m[0])
        ):
            stale._push(f"mount:{path}", functools.partial(stale._unmount, Path(path)))
        stale.close()  # newest first: filesystems, loop devices, then FUSE
        reaped.append(work)
    return reaped


class Workspace:
    """A temp directory plus the mounts and loop devices made in it; `close()` undoes all."""

    def __init__(self, parent: Path | None = None, *, keep: bool = False) -> None:
        if parent is not None:
            parent.mkdir(parents=True, exist_ok=True)
            reap_stale(parent)
        self.path = Path(tempfile.mkdtemp(prefix=PREFIX, dir=parent))
        (self.path / OWNER_FILE).write_text(f"{os.getpid()} {_process_start(os.getpid())}\n")
        self.run_dir = self.path / "run"
        self.run_dir.mkdir()
        self.keep = keep
        self._undo: list[tuple[str, Callable[[], None]]] = []
        self._launcher: CliLauncher | None = None

    @classmethod
    def adopt(cls, path: Path) -> Workspace:
        """A Workspace object for an existing work area (to tear it down)."""
        ws = cls.__new__(cls)
        ws.path = path
        ws.run_dir = path / "run"
        ws.keep = False
        ws._undo = []
        ws._launcher = None
        return ws

    # -- generic undo stack

    def _push(self, name: str, undo: Callable[[], None]) -> None:
        self._undo.append((name, undo))

    def _release(self, name: str) -> None:
        for i in range(len(self._undo) - 1, -1, -1):
            if self._undo[i][0] == name:
                _, undo = self._undo.pop(i)
                undo()
                return
        raise KeyError(name)

    def close(self) -> None:
        """Undo everything still attached, newest first; then remove the directory.

        A SIGINT/SIGTERM/SIGHUP arriving meanwhile cannot cut the cleanup short: it
        is deferred and raised as KeyboardInterrupt once everything is undone.
        (Blocking the signals alone is not enough: the kernel delivers them to
        any other thread that has them unblocked, and Python then runs the
        handler in the main thread anyway.)
        """
        with _signals_deferred() as pending:
            self._close()
        if pending:
            raise KeyboardInterrupt(f"signal {signal.Signals(pending[0]).name} during cleanup")

    def _close(self) -> None:
        old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, _CLEANUP_SIGNALS)
        errors = []
        try:
            while self._undo:
                name, undo = self._undo.pop()
                try:
                    undo()
                except Exception as exc:
                    log.error("cleanup of %s failed: %s", name, exc)
                    errors.append(f"{name}: {exc}")
            if not errors and not self.keep:
                shutil.rmtree(self.path, ignore_errors=True)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
        if errors:
            raise WorkspaceError(f"could not clean up {self.path}: " + "; ".join(errors))

    def __enter__(self) -> Workspace:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            self.close()
        except WorkspaceError:
            if exc_type is None:
                raise
            log.exception("cleanup after a failed build")

    # -- obdfuse FUSE mounts

    def obdfuse_env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.pop("NOTIFY_SOCKET", None)
        env["OBDFUSE_RUN_DIR"] = str(self.run_dir)
        return env

    def _obdfuse(self, args: list[str], *, what: str) -> None:
        """Run an `obdfuse` command: through the launcher if there is one, else a subprocess."""
        env = self.obdfuse_env()
        if self._launcher is None:
            from obdfuse.convert.launcher import CliLauncher

            self._launcher = CliLauncher().start(env)
            self._undo.insert(0, ("launcher", self._launcher.close))  # needed until the end
        try:
            code, text = self._launcher.run(args, env)
        except LauncherUnavailable:
            run_tool([sys.executable, "-m", "obdfuse", *args], what=what, env=env)
            return
        if code != 0:
            detail = text.strip().splitlines()
            raise WorkspaceError(f"{what} failed: {detail[-1] if detail else f'exit {code}'}")

    def fuse_mount(self, image: Path, mountpoint: Path, *extra: str) -> Path:
        """`obdfuse mount [extra] IMAGE MOUNTPOINT` (a daemon); returns MOUNTPOINT/image."""
        mountpoint.mkdir(parents=True, exist_ok=True)
        self._push(f"fuse:{mountpoint}", lambda: self._fuse_unmount(mountpoint))
        log_file = mountpoint.with_name(mountpoint.name + ".log")
        args = ["mount", *extra, "--log-file", str(log_file), str(image), str(mountpoint)]
        try:
            self._obdfuse(args, what=f"obdfuse mount {image}")
        except WorkspaceError as exc:
            tail = _tail(log_file)
            raise WorkspaceError(f"{exc}{'; daemon log: ' + tail if tail else ''}") from None
        return mountpoint / "image"

    def fuse_umount(self, mountpoint: Path) -> None:
        self._release(f"fuse:{mountpoint}")

    def _fuse_unmount(self, mountpoint: Path) -> None:
        try:
            self._obdfuse(["umount", str(mountpoint)], what=f"obdfuse umount {mountpoint}")
            return
        except WorkspaceError as exc:
            if not is_mounted(mountpoint) and "not mounted" in str(exc):
                return
            first = exc
        # the daemon is stuck or gone: detach the mount lazily so nothing stays behind
        for fallback in (
            ["fusermount3", "-u", "-z", str(mountpoint)],
            ["umount", "-l", str(mountpoint)],
        ):
            if not is_mounted(mountpoint):
                break
            with contextlib.suppress(WorkspaceError):
                run_tool(fallback, what="lazy unmount")
        if is_mounted(mountpoint):
            raise first

    # -- loop devices

    def loop_attach(self, backing: Path, *, read_only: bool = False) -> str:
        """`losetup --find --show`; returns /dev/loopN."""
        self._push(f"loop:{backing}", lambda: self._loop_detach_all(backing))
        cmd = ["losetup", "--find", "--show", *(["--read-only"] if read_only else []), str(backing)]
        return run_tool(cmd, what=f"losetup {backing}").strip()

    def loop_detach(self, backing: Path) -> None:
        self._release(f"loop:{backing}")

    def _loop_detach_all(self, backing: Path) -> None:
        for _ in range(100):
            devices = loop_devices_of(backing)
            if not devices:
                return
            for dev in devices:
                subprocess.run(
                    ["losetup", "-d", dev], capture_output=True, check=False, start_new_session=True
                )
            time.sleep(0.05)  # the device may be busy for a moment after an unmount
        raise WorkspaceError(f"loop devices of {backing} stay attached: {loop_devices_of(backing)}")

    # -- filesystem mounts

    def mount(self, device: str, target: Path, *, fstype: str = "ext4", options: str = "") -> Path:
        target.mkdir(parents=True, exist_ok=True)
        self._push(f"mount:{target}", lambda: self._unmount(target))
        cmd = ["mount", "-t", fstype, *(["-o", options] if options else []), device, str(target)]
        run_tool(cmd, what=f"mount {device}")
        return target

    def umount(self, target: Path) -> None:
        self._release(f"mount:{target}")

    def _unmount(self, target: Path) -> None:
        if not is_mounted(target):
            return
        try:
            run_tool(["umount", str(target)], what=f"umount {target}")
        except WorkspaceError:
            run_tool(["umount", "-l", str(target)], what=f"lazy umount {target}")
            raise


def _tail(path: Path, lines: int = 3) -> str:
    try:
        text = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return " | ".join(text[-lines:])
