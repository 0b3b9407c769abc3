"""Mount points and the FUSE device: checks before mounting, unmounting after.

Everything here is a thin shell over the kernel (`/proc/self/mountinfo`,
`/dev/fuse`) and `fusermount3`; errors are ObdfuseError with one clear line.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import stat
import subprocess
from pathlib import Path

from obdfuse.errors import ObdfuseError

FUSE_DEVICE = "/dev/fuse"
FSTYPE = "fuse.obdfuse"  # what /proc/self/mountinfo shows for our mounts (subtype=obdfuse)
UNMOUNT_TIMEOUT = 30.0  # seconds fusermount3 may take before it is considered hung


def _unescape_mountinfo(field: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as \\ooo octal."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def mounts() -> dict[str, str]:
    """Mount point → filesystem type for every mount visible to this process."""
    found: dict[str, str] = {}
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fields = left.split()
            if len(fields) >= 5 and right:
                found[_unescape_mountinfo(fields[4])] = right.split()[0]
    return found


def is_mounted(path: str | os.PathLike[str]) -> bool:
    """True if `path` (resolved without following a dead FUSE mount) is a mount point."""
    return os.path.abspath(path) in mounts()


def check_fuse_device(device: str = FUSE_DEVICE) -> None:
    """Raise unless `device` exists and is a character device.

    Access is not checked: unprivileged mounts go through the set-uid fusermount3.
    """
    try:
        st = os.stat(device)
    except FileNotFoundError:
        raise ObdfuseError(
            f"no FUSE device {device}: load the module (modprobe fuse) or, in a container, "
            f"pass the device in (--device {device})"
        ) from None
    if not stat.S_ISCHR(st.st_mode):
        raise ObdfuseError(f"{device} is not the FUSE character device (is FUSE available here?)")


def check_mountpoint(path: str | os.PathLike[str]) -> Path:
    """Return the absolute mount point if it is an empty directory nobody mounted on."""
    mountpoint = Path(os.path.abspath(path))
    if is_mounted(mountpoint):
        kind = mounts()[str(mountpoint)]
        raise ObdfuseError(
            f"{mountpoint} is already mounted ({kind}); unmount it first "
            f"(obdfuse umount {mountpoint})"
        )
    try:
        st = mountpoint.stat()
    except FileNotFoundError:
        raise ObdfuseError(f"mount point {mountpoint} does not exist") from None
    except OSError as exc:
        if exc.errno == errno.ENOTCONN:  # a FUSE daemon died; its mount is left behind
            raise ObdfuseError(
                f"{mountpoint} is a stale FUSE mount (its daemon died); "
                f"run: obdfuse umount {mountpoint}"
            ) from None
        raise
    if not stat.S_ISDIR(st.st_mode):
        raise ObdfuseError(f"mount point {mountpoint} is not a directory")
    if any(os.scandir(mountpoint)):
        raise ObdfuseError(f"mount point {mountpoint} is not empty")
    return mountpoint


def fuse_unmount(
    path: str | os.PathLike[str], *, lazy: bool = False, timeout: float = UNMOUNT_TIMEOUT
) -> None:
    """Unmount a FUSE mount with fusermount3 (works for root and for the mount's owner).

    fusermount3 looks at the mount point, which blocks while a hung daemon does not
    answer: after `timeout` seconds it is killed and ObdfuseError suggests --lazy.
    """
    mountpoint = os.path.abspath(path)
    tool = shutil.which("fusermount3") or shutil.which("fusermount")
    if tool is None:
        raise ObdfuseError("fusermount3 not found (install the fuse3 package)")
    cmd = [tool, "-u", *(["-z"] if lazy else []), mountpoint]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise ObdfuseError(
            f"cannot unmount {mountpoint}: {os.path.basename(tool)} did not finish within "
            f"{timeout:g} s (is its daemon hung?); try: obdfuse umount --lazy {mountpoint}"
        ) from None
    if proc.returncode == 0:
        return
    reason = (proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[-1]
    if "busy" in reason.lower():
        raise ObdfuseError(
            f"{mountpoint} is busy: {mountpoint}/image is still in use "
            f"(a loop device? see `losetup -j {mountpoint}/image`); detach it first"
        )
    raise ObdfuseError(f"cannot unmount {mountpoint}: {reason}")
