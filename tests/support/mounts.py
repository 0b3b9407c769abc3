"""Run real `obdfuse mount` daemons in tests and always clean up after them.

    with MountKit(tmp_path) as kit:                       # or the `mounts` fixture
        m = kit.mount(image, "--upper", str(upper), "--size", "1G")
        dev = kit.loop.attach(m.image_path)
        kit.loop.mount(dev, tmp_path / "rootfs")
        ...

Every daemon runs the real CLI in a subprocess with its own run directory
(`OBDFUSE_RUN_DIR`). `MountKit.close()` unmounts filesystems and detaches loop
devices first (tests.support.loop), then unmounts each FUSE mount
(fusermount3 -u, else -z, else umount -l) and kills any daemon left over.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.support.loop import LoopDevices

OBDFUSE = [sys.executable, "-m", "obdfuse"]
REPO = Path(__file__).resolve().parents[2]


def obdfuse_env(run_dir: Path, **extra: str) -> dict[str, str]:
    """The environment for an `obdfuse` subprocess: our run dir, no inherited NOTIFY_SOCKET."""
    env = dict(os.environ)
    env.pop("NOTIFY_SOCKET", None)
    env["OBDFUSE_RUN_DIR"] = str(run_dir)
    env.update(extra)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


def obdfuse(
    *args: str,
    run_dir: Path,
    check: bool = False,
    timeout: float = 120,
    cwd: Path | None = None,
    **env: str,
) -> subprocess.CompletedProcess[str]:
    """Run the `obdfuse` CLI; returns the completed process (stdout/stderr as text)."""
    proc = subprocess.run(
        [*OBDFUSE, *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        env=obdfuse_env(run_dir, **env),
        timeout=timeout,
        check=False,
    )
    if check and proc.returncode != 0:
        raise RuntimeError(f"obdfuse {' '.join(args)} failed ({proc.returncode}): {proc.stderr}")
    return proc


def _mounted(path: Path) -> bool:
    from obdfuse.mountpoint import is_mounted

    return is_mounted(path)


def _pid_alive(pid: int) -> bool:
    from obdfuse.runstate import process_start_time

    return process_start_time(pid) is not None


class ObdfuseMount:
    """One `obdfuse mount IMAGE MOUNTPOINT [args]` daemon (background or foreground)."""

    def __init__(
        self,
        image: str | os.PathLike[str],
        mountpoint: Path,
        args: tuple[str, ...],
        *,
        run_dir: Path,
        foreground: bool = False,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
    ) -> None:
        self.image = str(image)
        self.cwd = cwd
        self.mountpoint_arg = str(mountpoint)  # as given on the command line
        self.mountpoint = Path(cwd or ".", mountpoint).absolute()
        self.args = args
        self.run_dir = run_dir
        self.foreground = foreground
        self.env = env or {}
        self.proc: subprocess.Popen[str] | None = None  # foreground only
        self.pid: int | None = None
        self.log_file = run_dir / f"{self.mountpoint.name}.log"

    @property
    def image_path(self) -> Path:
        return self.mountpoint / "image"

    def start(self, timeout: float = 60) -> ObdfuseMount:
        """Mount and wait until it is live; raises with the daemon's stderr if it fails."""
        self.mountpoint.mkdir(parents=True, exist_ok=True)
        cmd = ["mount", *self.args, self.image, self.mountpoint_arg]
        if not self.foreground:
            obdfuse(*cmd, "--log-file", str(self.log_file), run_dir=self.run_dir, check=True,
                    timeout=timeout, cwd=self.cwd, **self.env)
            self.pid = self.stat()["pid"]
            return self
        with open(self.log_file, "ab") as log:
            self.proc = subprocess.Popen(
                [*OBDFUSE, *cmd, "--foreground"],
                stdout=log, stderr=log, text=True, cwd=self.cwd,
                env=obdfuse_env(self.run_dir, **self.env),
            )
        self.pid = self.proc.pid
        deadline = time.monotonic() + timeout
        while not self._stat_readable():
            if self.proc.poll() is not None:
                code = self.proc.returncode
                raise RuntimeError(f"obdfuse mount exited with {code}: {self.log()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"obdfuse mount not ready after {timeout} s: {self.log()}")
            time.sleep(0.05)
        return self

    def _stat_readable(self) -> bool:
        try:
            return _mounted(self.mountpoint) and bool(self.stat())
        except (OSError, ValueError):
            return False

    def stat(self) -> dict:
        """The daemon's `.obdfuse-stat` document."""
        return json.loads((self.mountpoint / ".obdfuse-stat").read_text())

    def log(self) -> str:
        try:
            return self.log_file.read_text()
        except FileNotFoundError:
            return ""

    def umount(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """`obdfuse umount MOUNTPOINT`; returns the completed process."""
        proc = obdfuse("umount", *args, str(self.mountpoint), run_dir=self.run_dir,
                       timeout=timeout + 10)
        if self.proc is not None and proc.returncode == 0:
            self.proc.wait(timeout=timeout)
        return proc

    def signal(self, signum: int) -> None:
        assert self.pid is not None
        os.kill(self.pid, signum)

    def wait_exit(self, timeout: float = 30) -> int | None:
        """Wait for the daemon to exit; its exit code in foreground mode, else None."""
        assert self.pid is not None
        if self.proc is not None:
            return self.proc.wait(timeout=timeout)
        deadline = time.monotonic() + timeout
        while _pid_alive(self.pid):
            if time.monotonic() > deadline:
                raise TimeoutError(f"daemon {self.pid} still alive after {timeout} s")
            time.sleep(0.02)
        return None

    def kill(self) -> None:
        """SIGKILL the daemon (a crash) and wait until it is gone; the mount stays, dead."""
        self.signal(signal.SIGKILL)
        self.wait_exit()

    def cleanup(self) -> None:
        """Unmount (forcefully if needed) and make sure the daemon is gone."""
        if _mounted(self.mountpoint):
            for cmd in (["fusermount3", "-u"], ["fusermount3", "-u", "-z"], ["umount", "-l"]):
                subprocess.run([*cmd, str(self.mountpoint)], capture_output=True, check=False)
                if not _mounted(self.mountpoint):
                    break
        if self.pid is not None and _pid_alive(self.pid):
            try:
                self.wait_exit(timeout=10)
            except TimeoutError:
                os.kill(self.pid, signal.SIGKILL)
                self.wait_exit(timeout=10)
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


class MountKit:
    """obdfuse mounts plus loop devices and filesystem mounts, all undone by `close()`."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = Path(tmp_path)
        self.run_dir = self.tmp_path / "obdfuse-run"
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.loop = LoopDevices()
        self.mounts: list[ObdfuseMount] = []
        self._count = 0

    def mount(
        self,
        image: str | os.PathLike[str],
        *args: str,
        mountpoint: Path | None = None,
        foreground: bool = False,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
    ) -> ObdfuseMount:
        """Start `obdfuse mount [args] IMAGE MOUNTPOINT`, live on return.

        With `cwd`, the command runs there and relative paths stay relative.
        """
        if mountpoint is None:
            self._count += 1
            mountpoint = self.tmp_path / f"obdfuse-mnt{self._count}"
        m = ObdfuseMount(image, mountpoint, args, run_dir=self.run_dir,
                         foreground=foreground, env=env, cwd=cwd)
        self.mounts.append(m)
        return m.start()

    def obdfuse(self, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
        """Run any `obdfuse` command with this kit's run directory."""
        return obdfuse(*args, run_dir=self.run_dir, **env)

    def close(self) -> None:
        try:
            self.loop.close()
        finally:
            for m in reversed(self.mounts):
                m.cleanup()

    def __enter__(self) -> MountKit:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
