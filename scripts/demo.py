"""The main job, end to end, on a sample image the demo builds itself.

1. Makes a small directory tree (text files, a script, a 32 MiB data file).
2. Starts a private OCI registry (Debian's docker-registry) on 127.0.0.1.
3. `obdfuse build`: turns the tree into an overlaybd image (ext4 inside, ZFile
   layers) and pushes it to that registry.
4. `obdfuse mount`: mounts the image straight from the registry, lazily, as
   MOUNTPOINT/image; the host loop-mounts that file and reads one small file.
5. `obdfuse stat`: shows that only a small part of the image was fetched.

Everything runs in a temporary directory and is torn down at the end, even on
failure or Ctrl-C.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

OBDFUSE = [sys.executable, "-m", "obdfuse"]


def say(text: str) -> None:
    print(text, flush=True)


def run(*args: str, capture: bool = False) -> str:
    """Run a command, echoing it like a shell session."""
    shown = ["obdfuse", *args[len(OBDFUSE) :]] if list(args[:3]) == OBDFUSE else list(args)
    say("$ " + " ".join(shown))
    done = subprocess.run(list(args), check=True, text=True, capture_output=capture)
    if capture:
        print(done.stdout, end="", flush=True)
    return done.stdout if capture else ""


def make_tree(root: Path) -> None:
    """A small root filesystem-like tree with one big file that the demo does not read."""
    (root / "etc").mkdir(parents=True)
    (root / "bin").mkdir()
    (root / "data").mkdir()
    (root / "etc" / "motd").write_text("Hello from a lazily mounted overlaybd image!\n")
    script = root / "bin" / "hello"
    script.write_text("#!/bin/sh\necho hello\n")
    script.chmod(0o755)
    os.symlink("../etc/motd", root / "bin" / "motd")
    rng = random.Random(42)
    with open(root / "data" / "blob.bin", "wb") as f:
        for _ in range(32):
            f.write(rng.randbytes(1 << 20))


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def registry(work: Path) -> Iterator[str]:
    """A throwaway docker-registry on 127.0.0.1; yields host:port."""
    port = free_port()
    config = work / "registry.yml"
    config.write_text(
        "version: 0.1\nlog:\n  level: error\n"
        f"storage:\n  filesystem:\n    rootdirectory: {work / 'registry'}\n"
        f"http:\n  addr: 127.0.0.1:{port}\n"
    )
    log = open(work / "registry.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(["docker-registry", "serve", str(config)], stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/", timeout=1)
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    sys.exit("demo: the registry did not start (see registry.log)")
                time.sleep(0.1)
        say(f"started a private registry at 127.0.0.1:{port}")
        yield f"127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(10)
        log.close()


def main() -> None:
    if os.geteuid() != 0:
        sys.exit("demo: run as root (FUSE mounts and loop devices)")
    work = Path(tempfile.mkdtemp(prefix="obdfuse-demo-"))
    mnt, rootfs = work / "mnt", work / "rootfs"
    mnt.mkdir()
    rootfs.mkdir()
    mounted_fuse = mounted_rootfs = False
    try:
        make_tree(work / "tree")
        say("made a sample tree: /etc/motd, /bin/hello, /bin/motd -> ../etc/motd, "
            "/data/blob.bin (32 MiB)")
        with registry(work) as host:
            ref = f"{host}/demo:latest"
            run(*OBDFUSE, "build", "--cache-dir", str(work / "build-cache"),
                str(work / "tree"), ref)
            run(*OBDFUSE, "mount", "--cache-dir", str(work / "cache"), ref, str(mnt))
            mounted_fuse = True
            run("ls", "-l", str(mnt))
            run("mount", "-o", "loop,ro", str(mnt / "image"), str(rootfs))
            mounted_rootfs = True
            run("cat", str(rootfs / "etc" / "motd"))
            run("ls", "-l", str(rootfs / "bin"), str(rootfs / "data"))
            stats = json.loads(run(*OBDFUSE, "stat", "--summary", str(mnt), capture=True))
            fetched, size = stats.get("bytes_fetched", 0), stats.get("image_bytes", 0)
            if size:
                say(f"fetched {fetched / 2**20:.1f} MiB of a {size / 2**20:.1f} MiB image "
                    f"({100 * fetched / size:.1f} %) in {stats.get('requests', 0)} requests")
            run("umount", str(rootfs))
            mounted_rootfs = False
            run(*OBDFUSE, "umount", str(mnt))
            mounted_fuse = False
        say("demo OK")
    finally:
        if mounted_rootfs:
            subprocess.run(["umount", "-l", str(rootfs)], check=False)
        if mounted_fuse:
            subprocess.run([*OBDFUSE, "umount", str(mnt)], check=False)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
