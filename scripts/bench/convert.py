#!/usr/bin/env python3
"""Benchmark: `obdfuse convert` of a multi-layer OCI image vs `umoci unpack` of the same image.

Builds (once, with umoci) a gzip OCI image of a few hundred MB from real system
files in several layers (plus a layer of whiteouts and changes), then measures in
the same run, page cache dropped before each pass:

- `umoci unpack` of the image (the baseline: extraction to a plain directory);
- `obdfuse convert oci:SRC oci:OUT` (base layer already cached), for each
  `--algorithm`;

and prints MB/s (uncompressed layer bytes / wall time) and the ratio convert/umoci,
plus the size of the overlaybd image (all layers incl. the base) vs the gzip OCI image.
Run as root.

    .venv/bin/python scripts/bench/convert.py [--sources DIR ...] [--rounds 2]
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DEFAULT_SOURCES = ["/usr/lib/gcc", "/usr/share/locale", "/usr/lib/python3.11", "/usr/share/perl"]


def run(*cmd: str | os.PathLike[str], env: dict[str, str] | None = None) -> str:
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(map(str, cmd))} failed: {proc.stderr.strip()}")
    return proc.stdout


def drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def build_image(layout: Path, sources: list[str], work: Path) -> None:
    """One layer per source directory, then a layer of deletions and changes."""
    image = f"{layout}:bench"
    run("umoci", "init", "--layout", layout)
    run("umoci", "new", "--image", image)
    for src in sources:
        run("umoci", "insert", "--image", image, src, "/" + src.strip("/"))
    bundle = work / "bundle"
    run("umoci", "unpack", "--image", image, bundle)
    rootfs = bundle / "rootfs"
    victim = next(p for p in sorted((rootfs / sources[0].strip("/")).rglob("*")) if p.is_file())
    victim.unlink()
    shutil.rmtree(next(p for p in (rootfs / sources[1].strip("/")).iterdir() if p.is_dir()))
    (rootfs / "etc").mkdir(exist_ok=True)
    (rootfs / "etc/changed").write_bytes(os.urandom(1 << 20))
    run("umoci", "repack", "--image", image, bundle)
    shutil.rmtree(bundle)


def manifest_of(layout: Path, tag: str) -> dict:
    index = json.loads((layout / "index.json").read_text())
    entry = next(
        m
        for m in index["manifests"]
        if m.get("annotations", {}).get("org.opencontainers.image.ref.name") == tag
    )
    return json.loads((layout / "blobs/sha256" / entry["digest"][7:]).read_text())


def uncompressed_bytes(layout: Path, manifest: dict) -> int:
    total = 0
    for layer in manifest["layers"]:
        with gzip.open(layout / "blobs/sha256" / layer["digest"][7:]) as f:
            while chunk := f.read(1 << 20):
                total += len(chunk)
    return total


def timed(fn) -> float:
    drop_caches()
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sources", nargs="+", default=DEFAULT_SOURCES)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--algorithm", nargs="+", default=["lz4", "zstd"])
    ap.add_argument("--work", type=Path, help="keep the image here between runs")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="obdfuse-bench-convert-"))
    work = args.work or tmp
    work.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    obdfuse = [sys.executable, "-m", "obdfuse"]
    try:
        src = work / "src"
        if not (src / "index.json").exists():
            print(f"building the source image from {', '.join(args.sources)} ...", flush=True)
            build_image(src, args.sources, tmp)
        manifest = manifest_of(src, "bench")
        raw = uncompressed_bytes(src, manifest)
        gz = sum(layer["size"] for layer in manifest["layers"])
        n_layers = len(manifest["layers"])
        print(f"image: {n_layers} layers, {raw / 1e6:.0f} MB as tar, {gz / 1e6:.0f} MB gzip")

        cache = tmp / "cache"
        run(
            *obdfuse,
            "build",
            "--cache-dir",
            cache,
            REPO / "scripts",
            f"oci:{tmp / 'warm'}",
            env=env,
        )  # builds and caches the base layer outside the timed runs

        results: dict[str, list[float]] = {"umoci unpack": []}
        sizes: dict[str, int] = {}
        for _ in range(args.rounds):
            bundle = tmp / "bundle"
            results["umoci unpack"].append(
                timed(lambda b=bundle: run("umoci", "unpack", "--image", f"{src}:bench", b))
            )
            shutil.rmtree(bundle)
            for algo in args.algorithm:
                out = tmp / f"out-{algo}"

                def convert(out=out, algo=algo) -> None:
                    run(
                        *obdfuse,
                        "convert",
                        "--cache-dir",
                        cache,
                        "--algorithm",
                        algo,
                        f"oci:{src}:bench",
                        f"oci:{out}:obd",
                        env=env,
                    )

                results.setdefault(f"obdfuse convert ({algo})", []).append(timed(convert))
                sizes[algo] = sum(d["size"] for d in manifest_of(out, "obd")["layers"])
                shutil.rmtree(out)

        base = min(results["umoci unpack"])
        base_median = statistics.median(results["umoci unpack"])
        print(
            f"\n{'':28} {'best s':>8} {'MB/s':>8} {'vs umoci':>9} {'median s':>9} {'vs umoci':>9}"
        )
        for name, times in results.items():
            best, median = min(times), statistics.median(times)
            print(
                f"{name:28} {best:8.2f} {raw / best / 1e6:8.1f} {base / best:8.2f}x"
                f" {median:9.2f} {base_median / median:8.2f}x"
            )
        print(f"\n{'size':28} {'MB':>8} {'vs gzip':>9}")
        print(f"{'OCI image (gzip layers)':28} {gz / 1e6:8.1f} {1:8.2f}x")
        for algo, size in sizes.items():
            print(f"{'overlaybd (' + algo + ', 4K)':28} {size / 1e6:8.1f} {size / gz:8.2f}x")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
