#!/usr/bin/env python3
"""Benchmark: reading an ext4 image through loop → FUSE → obdfuse vs loop → plain file.

Builds a 1 GiB ext4 image holding real files (copied from the system), turns
it into an obdfuse layer (a writable mount over nothing, committed as a ZFile),
then measures, in the same run and with page caches dropped before each pass:

- sequential read MB/s: every file of the tree read with 1 MiB reads;
- 4 KiB random read IOPS: O_DIRECT 4 KiB reads at random offsets of random
  files (queue depth 1 and --jobs threads);

for the plain file on a loop device (the baseline), the same file served raw
through obdfuse's FUSE front end (FUSE overhead alone), and the obdfuse layer.
Prints each as a ratio to the baseline and the daemon's RSS. Run as root.

    .venv/bin/python scripts/bench/mount.py [--sources DIR ...] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import random
import shutil
import sys
import tempfile
import threading
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from tests.support.loop import LoopDevices, mkfs_ext4, run  # noqa: E402
from tests.support.mounts import MountKit  # noqa: E402

DEFAULT_SOURCES = ["/usr/lib/python3.11", "/usr/lib/python3", "/usr/share/locale",
                   "/usr/share/doc"]
IMAGE_SIZE = 1 << 30


def drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def build_ext4(path: Path, sources: list[str], work: Path) -> int:
    """A 1 GiB ext4 image holding copies of `sources`; returns the bytes of file data."""
    with open(path, "wb") as f:
        f.truncate(IMAGE_SIZE)
    mkfs_ext4(path)
    with LoopDevices() as loop:
        dev = loop.attach(path)
        root = loop.mount(dev, work / "build-root")
        for src in sources:
            if os.path.isdir(src):
                run(["cp", "-a", src, str(root / src.strip("/").replace("/", "_"))])
        total = sum(p.stat().st_size for p in root.rglob("*") if p.is_file() and
                    not p.is_symlink())
    return total


def build_layer(raw: Path, work: Path, kit: MountKit) -> Path:
    """Copy the raw image into a writable obdfuse mount over nothing; commit it as a ZFile."""
    config = work / "empty.json"
    config.write_text(json.dumps({"lowers": []}))
    upper = work / "upper"
    layer = work / "layer.zfile"
    shutil.rmtree(upper, ignore_errors=True)  # a --workdir may hold an earlier run
    layer.unlink(missing_ok=True)
    m = kit.mount(config, "--upper", str(upper), "--size", str(IMAGE_SIZE))
    with open(raw, "rb") as src, open(m.image_path, "r+b") as dst:
        fd = src.fileno()
        offset = 0
        while True:
            try:
                offset = os.lseek(fd, offset, os.SEEK_DATA)
            except OSError:
                break
            end = os.lseek(fd, offset, os.SEEK_HOLE)
            while offset < end:
                chunk = os.pread(fd, min(1 << 20, end - offset), offset)
                if chunk.count(0) != len(chunk):
                    os.pwrite(dst.fileno(), chunk, offset)
                offset += len(chunk)
        os.fsync(dst.fileno())
    proc = m.umount()
    assert proc.returncode == 0, proc.stderr
    proc = kit.obdfuse("layer", "commit", "--zfile", str(upper / "data"), str(upper / "index"),
                       str(layer))
    assert proc.returncode == 0, proc.stderr
    image = work / "image.json"
    image.write_text(json.dumps({"lowers": [{"file": str(layer)}]}))
    return image


def list_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and not p.is_symlink())


def sequential_read(files: list[Path]) -> float:
    """MB/s reading every file with 1 MiB reads."""
    drop_caches()
    total = 0
    start = time.perf_counter()
    for path in files:
        with open(path, "rb", buffering=0) as f:
            while chunk := f.read(1 << 20):
                total += len(chunk)
    return total / (time.perf_counter() - start) / 1e6


def random_read(files: list[Path], count: int, jobs: int, seed: int = 1) -> float:
    """IOPS of O_DIRECT 4 KiB reads at random 4 KiB-aligned offsets of random files."""
    candidates = [p for p in files if p.stat().st_size >= 4096]
    rng = random.Random(seed)
    plan = []
    for _ in range(count):
        path = rng.choice(candidates)
        plan.append((path, rng.randrange(path.stat().st_size // 4096) * 4096))
    drop_caches()
    done = [0]
    lock = threading.Lock()

    def worker(part: list[tuple[Path, int]]) -> None:
        buf = mmap.mmap(-1, 4096)
        fds: dict[Path, int] = {}
        try:
            for path, off in part:
                fd = fds.get(path)
                if fd is None:
                    fd = fds[path] = os.open(path, os.O_RDONLY | os.O_DIRECT)
                os.preadv(fd, [buf], off)
        finally:
            for fd in fds.values():
                os.close(fd)
        with lock:
            done[0] += len(part)

    threads = [threading.Thread(target=worker, args=(plan[i::jobs],)) for i in range(jobs)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return done[0] / (time.perf_counter() - start)


def rss_mb(pid: int) -> tuple[float, float]:
    """(current, peak) resident set size of a process in MB."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text()
                  .splitlines() if ":" in line)
    return (int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024)


@contextmanager
def ext4_on(image_file: Path, target: Path, loop: LoopDevices):
    dev = loop.attach(image_file, read_only=True)
    root = loop.mount(dev, target, read_only=True)
    try:
        yield root
    finally:
        loop.umount(target)
        loop.detach(dev)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(image_file: Path, target: Path, loop: LoopDevices, args) -> dict[str, float]:
    with ext4_on(image_file, target, loop) as root:
        files = list_files(root)
        return {
            "seq_mbs": sequential_read(files),
            "rand_iops_qd1": random_read(files, args.random_reads, 1),
            f"rand_iops_x{args.jobs}": random_read(files, args.random_reads, args.jobs),
        }


def daemon_cost(m, args) -> float:
    """Daemon CPU µs per FUSE read request: direct 4 KiB random reads (first 400 MB, where
    ext4 put the data).

    Unlike wall-clock rates this barely depends on what else the machine runs.
    """
    size = os.path.getsize(m.image_path)
    rng = random.Random(7)
    before, cpu0 = m.stat()["counters"]["reads"], cpu_seconds(m.pid)
    fd = os.open(m.image_path, os.O_RDONLY | os.O_DIRECT)
    buf = mmap.mmap(-1, 4096)
    try:
        for _ in range(args.random_reads * 2):
            os.preadv(fd, [buf], rng.randrange(min(size, 400 << 20) // 4096) * 4096)
    finally:
        os.close(fd)
    requests = m.stat()["counters"]["reads"] - before
    return (cpu_seconds(m.pid) - cpu0) / max(1, requests) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sources", nargs="+", default=DEFAULT_SOURCES)
    parser.add_argument("--rounds", type=int, default=3,
                        help="passes per setup, interleaved; the best one counts (warm daemon)")
    parser.add_argument("--random-reads", type=int, default=4000)
    parser.add_argument("--jobs", type=int, default=4)
    parser.add_argument("--workdir", type=Path, help="keep the built images here")
    parser.add_argument("--mount-args", default="", help="extra `obdfuse mount` options")
    parser.add_argument("--no-layer", action="store_true", help="measure FUSE on the raw file only")
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("run as root (loop devices, mounts, drop_caches)")

    with ExitStack() as stack:
        work = args.workdir or Path(stack.enter_context(tempfile.TemporaryDirectory()))
        work.mkdir(parents=True, exist_ok=True)
        kit = stack.enter_context(MountKit(work / "kit"))
        raw = work / "disk.raw"
        t0 = time.perf_counter()
        data = build_ext4(raw, args.sources, work)
        daemons = {}
        extra = args.mount_args.split()
        daemons["raw"] = fuse_raw = kit.mount(raw, "--raw", "ro", *extra)
        setups = {
            "loop → file (baseline)": raw,
            "loop → FUSE → raw file": fuse_raw.image_path,
        }
        layer_note = ""
        if not args.no_layer:
            image = build_layer(raw, work, kit)
            layer_note = f", layer {(work / 'layer.zfile').stat().st_size / 1e6:.0f} MB"
            daemons["layer"] = layered = kit.mount(image, *extra)
            setups["loop → FUSE → obdfuse layer"] = layered.image_path
        print(f"built: {data / 1e6:.0f} MB of files in a 1 GiB ext4{layer_note}, "
              f"{time.perf_counter() - t0:.0f} s", flush=True)
        results: dict[str, dict[str, float]] = {}
        load_before = f"{os.getloadavg()[0]:.1f}"
        for _ in range(args.rounds):
            for name, path in setups.items():
                got = measure(path, work / "ro", kit.loop, args)
                best = results.setdefault(name, got)
                for key, value in got.items():
                    best[key] = max(best[key], value)
        print(f"load average before/after: {load_before} / {os.getloadavg()[0]:.1f}")
        base = results["loop → file (baseline)"]
        keys = list(base)
        print(f"{'setup':30} " + " ".join(f"{k:>22}" for k in keys))
        for name, res in results.items():
            cells = " ".join(f"{res[k]:>12.0f} ({res[k] / base[k]:4.2f}×)" for k in keys)
            print(f"{name:30} {cells}")
        for name, m in daemons.items():
            print(f"daemon CPU per 4 KiB read request ({name}): {daemon_cost(m, args):.1f} µs")
        for name, m in daemons.items():
            now, peak = rss_mb(m.pid)
            print(f"daemon RSS ({name}): {now:.0f} MB now, {peak:.0f} MB peak")
        if args.workdir is None:
            shutil.rmtree(work / "build-root", ignore_errors=True)


if __name__ == "__main__":
    main()
