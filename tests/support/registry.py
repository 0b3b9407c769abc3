"""A real OCI registry (Debian's docker-registry) on 127.0.0.1 for tests."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RegistryServer:
    """docker-registry serving from a temp dir; optional bcrypt basic auth.

    Use as a context manager or call start()/stop(). `storage` is the
    filesystem root, so tests can corrupt blobs on disk.
    """

    def __init__(self, root: Path, *, users: dict[str, str] | None = None) -> None:
        self.root = Path(root)
        self.storage = self.root / "data"
        self.port = free_port()
        self.users = users or {}
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    def blob_path(self, digest: str) -> Path:
        """Where the registry keeps a blob's bytes on disk."""
        algo, hexd = digest.split(":", 1)
        return self.storage / "docker/registry/v2/blobs" / algo / hexd[:2] / hexd / "data"

    def start(self) -> RegistryServer:
        self.root.mkdir(parents=True, exist_ok=True)
        auth = ""
        if self.users:
            htpasswd = self.root / "htpasswd"
            htpasswd.write_text("")
            for user, password in self.users.items():
                subprocess.run(
                    ["htpasswd", "-B", "-b", str(htpasswd), user, password],
                    check=True,
                    capture_output=True,
                )
            auth = f"auth:\n  htpasswd:\n    realm: obdfuse-test\n    path: {htpasswd}\n"
        config = self.root / "config.yml"
        config.write_text(
            "version: 0.1\nlog:\n  level: warn\n"
            f"storage:\n  filesystem:\n    rootdirectory: {self.storage}\n"
            "  delete:\n    enabled: true\n"
            f"http:\n  addr: 127.0.0.1:{self.port}\n{auth}"
        )
        log = open(self.root / "registry.log", "ab")  # noqa: SIM115 - lives with the process
        self.proc = subprocess.Popen(
            ["docker-registry", "serve", str(config)], stdout=log, stderr=log
        )
        log.close()
        self._wait_ready()
        return self

    def _wait_ready(self, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"registry exited: {(self.root / 'registry.log').read_text()}")
            try:
                urllib.request.urlopen(f"{self.url}/v2/", timeout=1)
                return
            except urllib.error.HTTPError as exc:  # 401 with auth on: it is up
                if exc.code == 401:
                    return
            except OSError:
                pass
            time.sleep(0.05)
        raise RuntimeError("registry did not become ready")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None

    def restart(self) -> None:
        """Start again on the same port and storage (after stop())."""
        self.start()

    def __enter__(self) -> RegistryServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def wipe(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)
