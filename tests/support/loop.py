"""Loop devices and filesystem mounts for end-to-end tests, always undone.

`LoopDevices` remembers every loop device it attached (and the file behind
it) and every filesystem it mounted; `close()` unmounts and detaches exactly
those, never anyone else's, even after a test failed half-way.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import stat
import subprocess
import time
from pathlib import Path


def run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess[str]:
    """Run a command, raising with its stderr on failure."""
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, **kwargs)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd))} failed ({proc.returncode}): {proc.stderr}")
    return proc


def mkfs_ext4(target: str | os.PathLike[str], *, root: Path | None = None, size: str = "") -> None:
    """Make an ext4 filesystem in a file or device, optionally populated from `root` (-d)."""
    cmd = ["mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0"]
    if root is not None:
        cmd += ["-d", str(root)]
    cmd.append(str(target))
    if size:
        cmd.append(size)
    run(cmd)


def _backing_file(device: str) -> str | None:
    name = os.path.basename(device)
    try:
        return Path(f"/sys/block/{name}/loop/backing_file").read_text().strip()
    except OSError:
        return None


class LoopDevices:
    """Attach loop devices and mount filesystems; `close()` undoes all of it."""

    def __init__(self) -> None:
        self._devices: dict[str, str] = {}  # /dev/loopN -> backing file it was attached to
        self._mounts: list[Path] = []

    def attach(self, path: str | os.PathLike[str], *, read_only: bool = False) -> str:
        """`losetup --find --show [-r] path`; returns the /dev/loopN path."""
        backing = os.path.abspath(path)
        cmd = ["losetup", "--find", "--show", *(["-r"] if read_only else []), backing]
        device = run(cmd).stdout.strip()
        self._devices[device] = _backing_file(device) or backing
        return device

    def detach(self, device: str) -> None:
        """Detach one of our loop devices (only if it still points at our file)."""
        backing = self._devices.pop(device)
        if _backing_file(device) != backing:
            return  # already gone, maybe reused by someone else: not ours to touch
        for _ in range(50):
            proc = subprocess.run(["losetup", "-d", device], capture_output=True, check=False)
            if proc.returncode == 0 or _backing_file(device) != backing:
                return
            time.sleep(0.1)  # busy right after an unmount
        raise RuntimeError(f"cannot detach {device}: {proc.stderr.decode().strip()}")

    def mount(
        self,
        source: str,
        target: str | os.PathLike[str],
        *,
        read_only: bool = False,
        options: str = "",
        fstype: str = "",
    ) -> Path:
        """`mount [-t fstype] [-o ro,...] source target`; remembered for `close()`."""
        target = Path(target)
        target.mkdir(parents=True, exist_ok=True)
        opts = ",".join(o for o in ("ro" if read_only else "", options) if o)
        cmd = ["mount", *(["-t", fstype] if fstype else []), *(["-o", opts] if opts else [])]
        run([*cmd, source, str(target)])
        self._mounts.append(target)
        return target

    def umount(self, target: str | os.PathLike[str]) -> None:
        target = Path(target)
        self._mounts.remove(target)
        run(["umount", str(target)])

    def close(self) -> None:
        """Unmount our filesystems (lazily if busy), then detach our loop devices."""
        errors: list[str] = []
        for target in reversed(self._mounts):
            proc = subprocess.run(["umount", str(target)], capture_output=True, check=False)
            if proc.returncode != 0:
                subprocess.run(["umount", "-l", str(target)], capture_output=True, check=False)
        self._mounts.clear()
        for device in list(self._devices):
            try:
                self.detach(device)
            except RuntimeError as exc:
                errors.append(str(exc))
        if errors:
            raise RuntimeError("; ".join(errors))

    def __enter__(self) -> LoopDevices:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def tree_snapshot(root: str | os.PathLike[str]) -> dict[str, tuple]:
    """Every entry under `root` as (kind, mode, content digest or link target), for comparing.

    `lost+found` is left out: it belongs to the filesystem, not to the tree.
    """
    root = Path(root)
    found: dict[str, tuple] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not (Path(dirpath) == root and d == "lost+found")]
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            st = path.lstat()
            mode = stat.S_IMODE(st.st_mode)
            rel = str(path.relative_to(root))
            if stat.S_ISLNK(st.st_mode):
                found[rel] = ("link", mode, os.readlink(path))
            elif stat.S_ISDIR(st.st_mode):
                found[rel] = ("dir", mode, None)
            else:
                digest = hashlib.sha256(path.read_bytes()).hexdigest()
                found[rel] = ("file", mode, digest)
    return found


@contextlib.contextmanager
def loop_devices():
    """A `LoopDevices` that is closed on exit."""
    devices = LoopDevices()
    try:
        yield devices
    finally:
        devices.close()
