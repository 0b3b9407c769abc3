#!/usr/bin/env python3
"""Cold start of a real program from a registry image: no trace vs trace replay vs full download.

Builds an ext4 image holding the system Python (interpreter, the shared
libraries it and its extension modules link, the stdlib with its .pyc
files), turns it into an overlaybd layer, pushes it to a docker-registry on
127.0.0.1 behind a rate-limiting, delay-adding proxy (default 100 Mbit/s,
20 ms RTT). The "start-up" is real: `chroot ROOT python3 -I -c "import json,
http.client, email.parser, ..."` on the loop-mounted image.

1. record: mount the local layer with `--record-trace`, run the start-up once.
2. per round (interleaved), each from a fresh cache directory, timing from
   `obdfuse mount` to the program's exit:
   - cold: `obdfuse mount REF`, loop-mount, run (lazy fetch on demand);
   - trace: same with `--replay-trace TRACE` (prefetch runs beside the start);
   - full: download the whole layer blob first, then mount it locally, run.

Prints medians, ratios (cold / trace, full / trace), bytes fetched and
requests, and a Markdown table for docs/benchmarks.md.
Usage: scripts/bench/coldstart.py [--mbit 100] [--rtt-ms 20] [--rounds 3]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import trio

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from obdfuse.registry.push import push_layers  # noqa: E402
from obdfuse.registry.session import Registry  # noqa: E402
from tests.support.images import make_layer  # noqa: E402
from tests.support.mounts import MountKit  # noqa: E402
from tests.support.registry import RegistryServer  # noqa: E402
from tests.support.slowproxy import SlowProxy  # noqa: E402

MiB = 1 << 20
IMAGE_SIZE = 2048 * MiB
FILLER = [Path("/usr/lib/x86_64-linux-gnu")]
SCENARIOS = {
    "cold": "cold, no trace",
    "trace": "cold, trace replay",
    "window": "cold, trace replay, 2 MiB window of 1 MiB requests",
    "full": "full download first",
    "warm": "warm cache (floor)",
}
PYTHON = Path("/usr/bin/python3.11")
PROGRAM = "import json, http.client, email.parser, argparse, logging, decimal, sqlite3, asyncio"


def shared_libs(binary: Path) -> list[Path]:
    out = subprocess.run(["ldd", str(binary)], capture_output=True, text=True).stdout
    libs = []
    for line in out.splitlines():
        parts = line.split()
        path = parts[2] if "=>" in parts and len(parts) > 2 else parts[0]
        if path.startswith("/"):
            libs.append(Path(path))
    return libs


def build_tree(root: Path, filler: list[Path]) -> None:
    """The interpreter, its stdlib (no site/dist-packages), every library they link, and
    `filler` directories (the rest of an OS image, which the start-up does not read)."""
    root.mkdir(parents=True, exist_ok=True)
    for top in ("bin", "lib", "lib64", "sbin"):  # merged /usr, like the host
        if os.path.islink(f"/{top}"):
            (root / top).symlink_to(os.readlink(f"/{top}"))
            (root / top).resolve().mkdir(parents=True, exist_ok=True)
    for folder in filler:
        shutil.copytree(folder, root / folder.relative_to("/"), symlinks=True,
                        dirs_exist_ok=True)
    stdlib = Path("/usr/lib/python3.11")
    shutil.copytree(stdlib, root / "usr/lib/python3.11", symlinks=True,
                    ignore=shutil.ignore_patterns("dist-packages", "site-packages", "test"))
    binaries = [PYTHON, *sorted((stdlib / "lib-dynload").glob("*.so"))]
    for binary in binaries:
        for lib in shared_libs(binary):
            dest = root / lib.relative_to("/")
            if not dest.exists() and not dest.is_symlink():
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(lib, dest)  # follows symlinks: a real file at the linked path
    (root / "usr/bin").mkdir(parents=True, exist_ok=True)
    shutil.copy2(PYTHON, root / "usr/bin/python3")


def make_image_layer(work: Path, filler: list[Path]) -> Path:
    tree, raw = work / "tree", work / "python.ext4"
    build_tree(tree, filler)
    with open(raw, "wb") as fh:
        fh.truncate(IMAGE_SIZE)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-O", "^has_journal", "-d", str(tree), str(raw)],
                   check=True)
    writes = []
    with open(raw, "rb") as fh:
        for off in range(0, IMAGE_SIZE, MiB):
            piece = fh.read(MiB)
            if piece.count(0) != len(piece):
                writes.append((off, piece))
    raw.unlink()
    shutil.rmtree(tree)
    return make_layer(work, "python", IMAGE_SIZE, writes)


def start_program(kit: MountKit, image_path: Path, root: Path) -> None:
    """Loop-mount the served image, run the program in it, undo the mounts."""
    device = kit.loop.attach(image_path, read_only=True)
    kit.loop.mount(device, root, read_only=True)
    try:
        subprocess.run(["chroot", str(root), "/usr/bin/python3", "-I", "-c", PROGRAM],
                       check=True, capture_output=True, timeout=600)
    finally:
        kit.loop.umount(root)
        kit.loop.detach(device)


def remote_totals(mount) -> dict:
    stat = mount.stat()
    layers = [la for img in stat.get("remote", []) for la in img["layers"]]
    out = {"fetched": sum(la["bytes_fetched"] for la in layers),
           "requests": sum(la["requests"] for la in layers),
           "size": sum(la["size"] for la in layers)}
    if "trace" in stat:
        out["replay"] = stat["trace"]["replay"]
    return out


def timed_start(kit: MountKit, image: str, work: Path, name: str, *args: str) -> dict:
    start = time.perf_counter()
    mount = kit.mount(image, *args, mountpoint=work / f"mnt-{name}")
    start_program(kit, mount.image_path, work / f"root-{name}")
    elapsed = time.perf_counter() - start
    totals = remote_totals(mount)
    mount.umount()
    return {"seconds": elapsed, **totals}


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(8 << 20):
            h.update(chunk)
    return h.hexdigest()


def download(host: str, repository: str, digest: str, dest: Path) -> int:
    """GET the whole blob through the proxy into `dest` (streamed), like a plain pull."""
    url = f"http://{host}/v2/{repository}/blobs/{digest}"
    with urllib.request.urlopen(url, timeout=60) as resp, open(dest, "wb") as out:
        shutil.copyfileobj(resp, out, 1 << 20)
    return dest.stat().st_size


def full_start(kit: MountKit, host: str, digest: str, work: Path, name: str) -> dict:
    start = time.perf_counter()
    local = work / f"{name}.layer"
    nbytes = download(host, "coldstart", digest, local)
    mount = kit.mount(local, mountpoint=work / f"mnt-{name}")
    start_program(kit, mount.image_path, work / f"root-{name}")
    elapsed = time.perf_counter() - start
    mount.umount()
    local.unlink()
    return {"seconds": elapsed, "fetched": nbytes, "requests": 1}


async def push(host: str, layer: Path) -> str:
    reg = Registry.open(f"{host}/coldstart:latest")
    try:
        return (await push_layers(reg, [layer])).reference
    finally:
        await reg.aclose()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mbit", type=float, default=100.0)
    ap.add_argument("--rtt-ms", type=float, default=20.0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--workdir", type=Path, help="keep (and reuse) the image and trace here")
    ap.add_argument("--no-filler", action="store_true",
                    help=f"leave out {FILLER[0]} (an image of just the interpreter)")
    ap.add_argument("--replay-args", default="", help="extra mount options for trace runs")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("run as root (FUSE, loop devices, chroot)")
    if not PYTHON.exists():
        sys.exit(f"the start-up runs the system Python: {PYTHON} is missing (apt install "
                 "python3.11)")
    with tempfile.TemporaryDirectory(prefix="obdfuse-coldstart-") as tmp:
        work = Path(tmp)
        keep = args.workdir or work
        keep.mkdir(parents=True, exist_ok=True)
        layer = keep / "python.commit"
        if not layer.exists():
            layer = make_image_layer(keep, [] if args.no_filler else FILLER)
        trace = keep / "startup.trace"
        results: dict[str, list[dict]] = {k: [] for k in SCENARIOS}
        with MountKit(work) as kit, RegistryServer(work / "registry") as registry:
            if not trace.exists():
                rec = kit.mount(layer, "--record-trace", str(trace), mountpoint=work / "mnt-rec")
                start_program(kit, rec.image_path, work / "root-rec")
                rec.umount()  # closing the image stops the recording and writes the trace
            info = json.loads(kit.obdfuse("trace", "info", "--json", str(trace)).stdout)
            ref = trio.run(push, registry.host, layer)
            digest = ref.split("@", 1)[1]
            blob_digest = "sha256:" + file_sha256(layer)  # push uploads the file as is
            with SlowProxy(registry.port, mbit=args.mbit, rtt_ms=args.rtt_ms) as proxy:
                slow_ref = f"{proxy.host}/coldstart@{digest}"
                for r in range(args.rounds):
                    results["cold"].append(timed_start(
                        kit, slow_ref, work, f"cold{r}", "--cache-dir", str(work / f"c{r}")))
                    results["trace"].append(timed_start(
                        kit, slow_ref, work, f"trace{r}", "--cache-dir", str(work / f"t{r}"),
                        "--replay-trace", str(trace), *args.replay_args.split()))
                    # the floor: everything already in the cache (the trace run's)
                    results["warm"].append(timed_start(
                        kit, slow_ref, work, f"warm{r}", "--cache-dir", str(work / f"t{r}")))
                    # replay with a small bytes-in-flight window and 1 MiB requests
                    results["window"].append(timed_start(
                        kit, slow_ref, work, f"win{r}", "--cache-dir", str(work / f"p{r}"),
                        "--replay-trace", str(trace), "--prefetch-window", "2M",
                        "--prefetch-request-size", "1M"))
                    results["full"].append(
                        full_start(kit, proxy.host, blob_digest, work, f"full{r}"))
    report(args, info, results)


def report(args, info: dict, results: dict[str, list[dict]]) -> None:
    med = {k: statistics.median(x["seconds"] for x in v) for k, v in results.items()}
    last = {k: v[-1] for k, v in results.items()}
    size = last["cold"]["size"]
    print(f"link: {args.mbit:g} Mbit/s, {args.rtt_ms:g} ms RTT; {args.rounds} rounds (median)")
    print(f"program: python3 -I -c {PROGRAM!r}")
    print(f"layer blob {size / MiB:.1f} MiB; trace: {info['records']} records, "
          f"{info['bytes'] / MiB:.2f} MiB of layer reads")
    for k in SCENARIOS:
        times = ", ".join(f"{x['seconds']:.2f}" for x in results[k])
        replay = last[k].get("replay")
        extra = (f"; replay {replay['fills']} fills in {replay['seconds']} s"
                 if replay else "")
        print(f"{k:>8}: median {med[k]:.2f} s ({times}); fetched "
              f"{last[k]['fetched'] / MiB:.2f} MiB in {last[k]['requests']} requests{extra}")
    print(f"ratio cold/trace: {med['cold'] / med['trace']:.2f}x; full/trace: "
          f"{med['full'] / med['trace']:.2f}x; window/trace: "
          f"{med['window'] / med['trace']:.2f}x; trace/warm: {med['trace'] / med['warm']:.2f}x")
    print()
    print(f"Link {args.mbit:g} Mbit/s, {args.rtt_ms:g} ms RTT; layer blob {size / MiB:.1f} MiB; "
          f"start-up: {info['records']} records, {info['bytes'] / MiB:.2f} MiB of layer reads.")
    print()
    print("| scenario | median time | fetched | requests | vs trace replay |")
    print("|---|---:|---:|---:|---:|")
    for k, label in SCENARIOS.items():
        fetched = f"{last[k]['fetched'] / MiB:.1f} MiB"
        print(f"| {label} | {med[k]:.2f} s | {fetched} | {last[k]['requests']} "
              f"| {med[k] / med['trace']:.2f}x |")


if __name__ == "__main__":
    main()
