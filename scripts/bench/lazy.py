#!/usr/bin/env python3
"""Lazy fetch vs. full download, over a throttled link to a real registry.

Builds an ext4 image holding a real Python installation (mkfs.ext4 -d), turns
it into an overlaybd layer (tar(ZFile(LSMT))), pushes it to a docker-registry
on 127.0.0.1 and puts a rate-limiting, delay-adding TCP proxy in front
(default 100 Mbit/s, 20 ms RTT). Then it reads the files one program needs
(the modules `python3 -c "import json, http.client, email.parser"` loads,
plus the interpreter binary) at the block ranges ext4 keeps them (from
debugfs: superblock, group descriptors, inode table blocks, directory blocks,
file blocks) in two ways:

- lazy: open the image reference with a cold cache and read only those ranges;
- full: download the whole layer blob first, then read the same ranges locally.

Prints times, bytes fetched vs. image size and requests, plus a Markdown
table for docs/benchmarks.md. Usage: scripts/bench/lazy.py [--mbit 100] [--rtt-ms 20]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import trio

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from obdfuse.asyncio_bridge import run_in_asyncio  # noqa: E402
from obdfuse.image import open_image  # noqa: E402
from obdfuse.registry.push import push_layers  # noqa: E402
from obdfuse.registry.session import Registry  # noqa: E402
from obdfuse.remote_image import RemoteOptions, remote_stats  # noqa: E402
from tests.support.images import make_layer  # noqa: E402
from tests.support.mounts import MountKit  # noqa: E402
from tests.support.registry import RegistryServer  # noqa: E402
from tests.support.slowproxy import SlowProxy  # noqa: E402

MiB = 1 << 20
PROGRAM = "import json, http.client, email.parser"
IMAGE_SIZE = 2048 * MiB
BLOCK = 4096


def program_files() -> list[Path]:
    """Files the program loads: the interpreter and every module file it imports."""
    code = (f"{PROGRAM}; import sys; print('\\n'.join(sorted({{m.__file__ for m in "
            "list(sys.modules.values()) if getattr(m, '__file__', None)})))")
    out = subprocess.run([sys.executable, "-I", "-c", code], capture_output=True, text=True,
                         check=True).stdout.split()
    stdlib = Path(sysconfig.get_paths()["stdlib"]).resolve()
    files = [Path(os.path.realpath(sys.executable))]
    for name in out:
        path = Path(name).resolve()
        if stdlib in path.parents:
            files.append(path)
            cached = path.parent / "__pycache__" / f"{path.stem}.{sys.implementation.cache_tag}.pyc"
            if cached.exists():
                files.append(cached)
    return files


def build_tree(root: Path, small: bool) -> Path:
    """Copy the Python installation (stdlib, and site-packages unless `small`)."""
    stdlib = Path(sysconfig.get_paths()["stdlib"]).resolve()
    skip = ["site-packages"] if small else []
    shutil.copytree(stdlib, root / stdlib.relative_to("/"), symlinks=True,
                    ignore=shutil.ignore_patterns(*skip))
    exe = Path(os.path.realpath(sys.executable))
    (root / exe.parent.relative_to("/")).mkdir(parents=True, exist_ok=True)
    shutil.copy2(exe, root / exe.relative_to("/"))
    libdir = Path(sysconfig.get_config_var("LIBDIR"))
    for lib in libdir.glob("libpython*.so*"):
        shutil.copy2(lib, root / libdir.relative_to("/") / lib.name, follow_symlinks=False)
    return stdlib


def run_program(rootfs: Path) -> float:
    """Start the image's own interpreter (binary, libpython, stdlib all from `rootfs`)."""
    exe = Path(os.path.realpath(sys.executable))
    libdir = Path(sysconfig.get_config_var("LIBDIR"))
    start = time.perf_counter()
    out = subprocess.run(
        [str(rootfs / exe.relative_to("/")), "-I", "-c", f"{PROGRAM}; import sys; "
         "print(sys.prefix)"],
        env={"LD_LIBRARY_PATH": str(rootfs / libdir.relative_to("/"))},
        capture_output=True, text=True, check=True).stdout.strip()
    if not out.startswith(str(rootfs)):
        raise RuntimeError(f"the interpreter did not run from the image: prefix {out}")
    return time.perf_counter() - start


def mounted_start(kit, image: str, work: Path, name: str, *args: str) -> dict:
    """obdfuse mount IMAGE, loop-mount its ext4 read-only, run the program."""
    start = time.perf_counter()
    m = kit.mount(image, *args)
    dev = kit.loop.attach(m.image_path, read_only=True)
    rootfs = kit.loop.mount(dev, work / f"rootfs-{name}", read_only=True)
    run_s = run_program(rootfs)
    total = time.perf_counter() - start
    stat = m.stat().get("remote") or [{"layers": [{}]}]
    layer = stat[0]["layers"][0]
    kit.loop.umount(rootfs)
    kit.loop.detach(dev)
    m.umount()
    return {"total_s": total, "program_s": run_s, "fetched": layer.get("bytes_fetched", 0),
            "requests": layer.get("requests", 0)}


def make_ext4(tree: Path, image: Path) -> None:
    with open(image, "wb") as fh:
        fh.truncate(IMAGE_SIZE)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-b", str(BLOCK), "-O", "^has_journal", "-N", "262144",
                    "-d", str(tree), str(image)], check=True)


def data_writes(image: Path) -> list[tuple[int, bytes]]:
    """The non-zero 1 MiB pieces of the raw image (a sparse copy into the layer)."""
    writes = []
    with open(image, "rb") as fh:
        for off in range(0, IMAGE_SIZE, MiB):
            piece = fh.read(MiB)
            if piece.count(0) != len(piece):
                writes.append((off, piece))
    return writes


def debugfs(image: Path, commands: list[str]) -> str:
    with tempfile.NamedTemporaryFile("w", suffix=".cmds") as f:
        f.write("\n".join(commands) + "\n")
        f.flush()
        return subprocess.run(["debugfs", "-f", f.name, str(image)], capture_output=True,
                              text=True, check=True).stdout


def read_plan(image: Path, files: list[Path]) -> list[tuple[int, int]]:
    """Byte ranges (offset, length) ext4 reads to open and read `files`, in order."""
    dirs: list[Path] = []
    for f in files:
        for d in reversed(f.parents):
            if d not in dirs:
                dirs.append(d)
    ranges: list[tuple[int, int]] = [(0, 64 * 1024)]  # superblock + group descriptors
    for path in [*dirs, *files]:
        out = debugfs(image, [f"imap {path}", f"blocks {path}"])
        m = re.search(r"located at block (\d+), offset 0x([0-9a-f]+)", out)
        if m:
            ranges.append((int(m.group(1)) * BLOCK, BLOCK))
        numbers = [int(x) for line in out.splitlines() if re.fullmatch(r"[\d ]+", line.strip())
                   for x in line.split()]
        run_start = prev = None
        for b in numbers:
            if run_start is not None and b == prev + 1:
                prev = b
                continue
            if run_start is not None:
                ranges.append((run_start * BLOCK, (prev - run_start + 1) * BLOCK))
            run_start = prev = b
        if run_start is not None:
            ranges.append((run_start * BLOCK, (prev - run_start + 1) * BLOCK))
    return ranges


async def read_ranges(stack, ranges) -> int:
    total = 0
    for off, n in ranges:
        for o in range(off, off + n, 128 * 1024):  # FUSE-sized requests
            total += len(await stack.pread(o, min(128 * 1024, off + n - o)))
    return total


async def push(host: str, layer: Path) -> str:
    reg = Registry.open(f"{host}/bench:latest")
    try:
        return (await push_layers(reg, [layer])).reference
    finally:
        await reg.aclose()


async def lazy_run(ref: str, cache: Path, ranges, chunk: int) -> dict:
    start = time.perf_counter()
    stack = await open_image(ref, remote=RemoteOptions(cache_dir=cache, chunk_size=chunk))
    opened = time.perf_counter() - start
    try:
        nbytes = await read_ranges(stack, ranges)
        elapsed = time.perf_counter() - start
        (layer,) = remote_stats()["remote"][0]["layers"]
    finally:
        await stack.aclose()
    return {"open_s": opened, "total_s": elapsed, "read": nbytes, "fetched": layer["bytes_fetched"],
            "requests": layer["requests"], "size": layer["size"]}


async def download(ref: str, path: Path) -> None:
    reg = Registry.open(ref)
    try:
        image = await reg.resolve()
        (desc,) = image.manifest.layers
        await run_in_asyncio(reg.client.download_blob, image.reference.repository,
                             desc.digest, desc.size, path, 600.0)
    finally:
        await reg.aclose()


async def full_run(ref: str, workdir: Path, ranges) -> dict:
    reg = Registry.open(ref)
    start = time.perf_counter()
    try:
        image = await reg.resolve()
        (desc,) = image.manifest.layers
        local = workdir / "downloaded.layer"
        await run_in_asyncio(reg.client.download_blob, image.reference.repository,
                             desc.digest, desc.size, local, 600.0)
    finally:
        await reg.aclose()
    downloaded = time.perf_counter() - start
    stack = await open_image(local)
    try:
        nbytes = await read_ranges(stack, ranges)
    finally:
        await stack.aclose()
    return {"download_s": downloaded, "total_s": time.perf_counter() - start, "read": nbytes,
            "fetched": local.stat().st_size, "requests": 1}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mbit", type=float, default=100.0)
    ap.add_argument("--rtt-ms", type=float, default=20.0)
    ap.add_argument("--chunk", type=int, default=MiB)
    ap.add_argument("--small", action="store_true", help="stdlib only, no site-packages")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="obdfuse-bench-") as tmp:
        work = Path(tmp)
        build_tree(work / "tree", args.small)
        make_ext4(work / "tree", work / "python.ext4")
        files = program_files()
        ranges = read_plan(work / "python.ext4", files)
        layer = make_layer(work, "python", IMAGE_SIZE, data_writes(work / "python.ext4"))
        with RegistryServer(work / "registry") as registry:
            ref = trio.run(push, registry.host, layer)
            digest = ref.split("@", 1)[1]
            with SlowProxy(registry.port, mbit=args.mbit, rtt_ms=args.rtt_ms) as proxy:
                slow_ref = f"{proxy.host}/bench@{digest}"
                lazy = trio.run(lazy_run, slow_ref, work / "cache", ranges, args.chunk)
                lazy_bytes_on_link = proxy.bytes_down
                full = trio.run(full_run, slow_ref, work, ranges)
                with MountKit(work / "kit") as kit:
                    lazy_mount = mounted_start(kit, slow_ref, work, "lazy", "--cache-dir",
                                               str(work / "cache2"), "--chunk-size",
                                               str(args.chunk))
                    t0 = time.perf_counter()
                    trio.run(download, slow_ref, work / "full.layer")
                    dl = time.perf_counter() - t0
                    full_mount = mounted_start(kit, str(work / "full.layer"), work, "full")
                    full_mount["total_s"] += dl
                    full_mount["fetched"] = (work / "full.layer").stat().st_size
                    full_mount["requests"] = 1
    size = lazy["size"]
    print(f"link: {args.mbit:g} Mbit/s, {args.rtt_ms:g} ms RTT; cache chunk {args.chunk} B")
    print(f"image: ext4 with {len(files)} program files; layer blob {size / MiB:.1f} MiB; "
          f"{len(ranges)} ranges, {lazy['read'] / MiB:.2f} MiB read")
    print(f"lazy: open {lazy['open_s']:.2f} s, total {lazy['total_s']:.2f} s, fetched "
          f"{lazy['fetched'] / MiB:.2f} MiB ({100 * lazy['fetched'] / size:.1f}% of the blob) "
          f"in {lazy['requests']} range requests ({lazy_bytes_on_link / MiB:.2f} MiB on the link)")
    print(f"full: download {full['download_s']:.2f} s, total {full['total_s']:.2f} s, "
          f"fetched {full['fetched'] / MiB:.2f} MiB")
    print(f"ratio full/lazy time: {full['total_s'] / lazy['total_s']:.1f}x; "
          f"bytes: {full['fetched'] / max(1, lazy['fetched']):.1f}x")
    print(f"program start over FUSE + loop-mounted ext4: lazy {lazy_mount['total_s']:.2f} s "
          f"(program {lazy_mount['program_s']:.2f} s, fetched {lazy_mount['fetched'] / MiB:.2f} "
          f"MiB in {lazy_mount['requests']} requests); full download first "
          f"{full_mount['total_s']:.2f} s (program {full_mount['program_s']:.2f} s); "
          f"speed-up {full_mount['total_s'] / lazy_mount['total_s']:.1f}x")
    print()
    print("| mode | link | blob | lazy: time / fetched / requests "
          "| full download first: time / fetched | speed-up |")
    print("|---|---|---|---|---|---|")
    print(f"| mount + loop-mount + run `python3 -c '{PROGRAM}'` from the image "
          f"| {args.mbit:g} Mbit/s, {args.rtt_ms:g} ms RTT | {size / MiB:.1f} MiB "
          f"| {lazy_mount['total_s']:.2f} s / {lazy_mount['fetched'] / MiB:.2f} MiB / "
          f"{lazy_mount['requests']} | {full_mount['total_s']:.2f} s / "
          f"{full_mount['fetched'] / MiB:.2f} MiB "
          f"| {full_mount['total_s'] / lazy_mount['total_s']:.1f}x |")
    print(f"| replay of the program's ext4 reads ({len(files)} files, "
          f"{lazy['read'] / MiB:.2f} MiB) on `open_image` | {args.mbit:g} Mbit/s, "
          f"{args.rtt_ms:g} ms RTT | {size / MiB:.1f} MiB "
          f"| {lazy['total_s']:.2f} s / {lazy['fetched'] / MiB:.2f} MiB / {lazy['requests']} "
          f"| {full['total_s']:.2f} s / {full['fetched'] / MiB:.2f} MiB "
          f"| {full['total_s'] / lazy['total_s']:.1f}x |")
    print()
    print("| link | blob | program reads | lazy: time / fetched / requests "
          "| full download first: time / fetched | speed-up |")
    print("|---|---|---|---|---|---|")
    print(f"| {args.mbit:g} Mbit/s, {args.rtt_ms:g} ms RTT | {size / MiB:.1f} MiB "
          f"| {len(files)} files, {lazy['read'] / MiB:.2f} MiB "
          f"| {lazy['total_s']:.2f} s / {lazy['fetched'] / MiB:.2f} MiB / {lazy['requests']} "
          f"| {full['total_s']:.2f} s / {full['fetched'] / MiB:.2f} MiB "
          f"| {full['total_s'] / lazy['total_s']:.1f}x |")


if __name__ == "__main__":
    main()
