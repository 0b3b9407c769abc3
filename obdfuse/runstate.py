"""Where a running mount daemon is recorded, so `obdfuse umount` can find and await it.

One small JSON file per mount point in the run directory
(`$OBDFUSE_RUN_DIR`, else `/run/obdfuse` for root, else
`$XDG_RUNTIME_DIR/obdfuse`, else `/tmp/obdfuse-<uid>`), named after a hash of the
absolute mount point. It holds the daemon's pid and kernel start time (so a
recycled pid is never mistaken for the daemon), the image and the log file.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from obdfuse.fileio import atomic_output


def run_dir() -> Path:
    """The directory holding mount records and background daemons' logs."""
    if env := os.environ.get("OBDFUSE_RUN_DIR"):
        return Path(env)
    if os.geteuid() == 0:
        return Path("/run/obdfuse")
    if xdg := os.environ.get("XDG_RUNTIME_DIR"):
        return Path(xdg) / "obdfuse"
    return Path(f"/tmp/obdfuse-{os.getuid()}")


def _key(mountpoint: str | os.PathLike[str]) -> str:
    path = os.path.abspath(mountpoint)
    digest = hashlib.sha256(path.encode("utf-8", "surrogateescape")).hexdigest()[:16]
    tail = "".join(c if c.isalnum() or c in "-_." else "_" for c in os.path.basename(path))
    return f"{tail[:40]}-{digest}"


def record_path(mountpoint: str | os.PathLike[str]) -> Path:
    """The record file of the mount at `mountpoint`."""
    return run_dir() / f"{_key(mountpoint)}.json"


def default_log_path(mountpoint: str | os.PathLike[str]) -> Path:
    """Where a daemonized mount writes its log unless told otherwise."""
    return run_dir() / f"{_key(mountpoint)}.log"


def process_start_time(pid: int) -> int | None:
    """The kernel start time (clock ticks since boot) of a live process, else None."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = raw[raw.rindex(")") + 2 :].split()
    if fields[0] in ("Z", "X"):  # exited, waiting to be reaped
        return None
    return int(fields[19])


@dataclass
class MountRecord:
    """What a live daemon publishes about itself."""

    pid: int
    start_time: int
    mountpoint: str
    image: str
    log_file: str | None = None

    @classmethod
    def for_this_process(cls, mountpoint: str, image: str, log_file: str | None) -> MountRecord:
        """The record describing the calling process as the daemon of `mountpoint`."""
        pid = os.getpid()
        return cls(pid, process_start_time(pid) or 0, mountpoint, image, log_file)

    def alive(self) -> bool:
        """True while the recorded daemon (not a process that reused its pid) runs."""
        return process_start_time(self.pid) == self.start_time

    def wait_exit(self, timeout: float) -> bool:
        """Wait until the daemon has exited; False if still alive after `timeout` s."""
        deadline = time.monotonic() + timeout
        while self.alive():
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.05)
        return True


def write_record(record: MountRecord) -> Path:
    """Publish `record` (replaced atomically); returns its path."""
    path = record_path(record.mountpoint)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
    with atomic_output(path) as f:
        f.write((json.dumps(asdict(record)) + "\n").encode())
    return path


def read_record(mountpoint: str | os.PathLike[str]) -> MountRecord | None:
    """The record of the mount at `mountpoint`, or None if there is none (or it is garbled)."""
    try:
        data = json.loads(record_path(mountpoint).read_text())
        return MountRecord(**data)
    except (FileNotFoundError, ValueError, TypeError):
        return None


def remove_record(record: MountRecord) -> None:
    """Remove the record if it is still ours (a newer daemon may have replaced it)."""
    current = read_record(record.mountpoint)
    if current is not None and current.pid == record.pid:
        record_path(record.mountpoint).unlink(missing_ok=True)
