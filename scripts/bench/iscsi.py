#!/usr/bin/env python3
"""Benchmark: obdfuse's iSCSI target against Debian's tgt on the same backing data.

Workloads (libiscsi's iscsi-perf and qemu-img as initiators, over 127.0.0.1):
  seq-read     iscsi-perf, 256 KiB requests, 16 in flight           (MB/s)
  convert      qemu-img convert of the whole LUN to a file on tmpfs  (MB/s)
  rand-4k      iscsi-perf --random, 4 KiB requests, 32 in flight     (IOPS)
Runs are interleaved (obdfuse, tgt, tgt, obdfuse, ...) so machine load hits both
alike; the medians and their ratio (obdfuse / tgt, higher is better) are printed.

With --image, obdfuse also serves an overlaybd image (ZFile-compressed LSMT) and
tgt its flat raw conversion, so the row measures the whole read path.

    .venv/bin/python scripts/bench/iscsi.py [--size 256M] [--rounds 3] [--seconds 4]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from obdfuse.cli.params import parse_size  # noqa: E402
from tests.support.iscsi import ObdfuseTarget, TgtTarget  # noqa: E402

_AVG = re.compile(r"iops average (\d+) \((\d+) MB/s\)")


def iscsi_perf(url: str, seconds: int, *, blocks: int, depth: int, random: bool) -> tuple[int, int]:
    """(IOPS, MB/s) averaged over the run."""
    cmd = ["iscsi-perf", "-m", str(depth), "-b", str(blocks), "-t", str(seconds)]
    if random:
        cmd.append("-r")
    out = subprocess.run([*cmd, url], capture_output=True, text=True, errors="replace",
                         timeout=seconds + 30)
    found = _AVG.findall(out.stdout.replace("\r", "\n"))
    if not found:
        raise RuntimeError(f"iscsi-perf gave no result: {out.stdout[-300:]} {out.stderr[-300:]}")
    iops, mbs = found[-1]
    return int(iops), int(mbs)


def qemu_convert(url: str, size: int, scratch: Path) -> float:
    """MB/s of `qemu-img convert` of the LUN to a raw file on tmpfs."""
    out = scratch / "convert.raw"
    t0 = time.perf_counter()
    subprocess.run(["qemu-img", "convert", "-O", "raw", url, str(out)], check=True,
                   capture_output=True, timeout=600)
    elapsed = time.perf_counter() - t0
    out.unlink()
    return size / elapsed / 1e6


def measure(targets: dict[str, str], size: int, rounds: int, seconds: int,
            scratch: Path) -> dict[str, dict[str, list[float]]]:
    results: dict[str, dict[str, list[float]]] = {
        w: {name: [] for name in targets} for w in ("seq-read", "convert", "rand-4k")}
    names = list(targets)
    for r in range(rounds):
        order = names if r % 2 == 0 else names[::-1]
        for name in order:
            url = targets[name]
            results["seq-read"][name].append(
                iscsi_perf(url, seconds, blocks=512, depth=16, random=False)[1])
            results["convert"][name].append(qemu_convert(url, size, scratch))
            results["rand-4k"][name].append(
                iscsi_perf(url, seconds, blocks=8, depth=32, random=True)[0])
    return results


def report(title: str, results: dict[str, dict[str, list[float]]]) -> dict:
    units = {"seq-read": "MB/s", "convert": "MB/s", "rand-4k": "IOPS"}
    print(f"\n{title}")
    print(f"{'workload':10} {'obdfuse':>12} {'tgt':>12} {'ratio':>7}   runs (obdfuse | tgt)")
    summary = {}
    for workload, by_target in results.items():
        ours = statistics.median(by_target["obdfuse"])
        ref = statistics.median(by_target["tgt"])
        ratio = ours / ref if ref else float("nan")
        summary[workload] = {"obdfuse": ours, "tgt": ref, "ratio": round(ratio, 2),
                             "unit": units[workload]}
        runs = (" ".join(f"{v:.0f}" for v in by_target["obdfuse"]) + " | "
                + " ".join(f"{v:.0f}" for v in by_target["tgt"]))
        print(f"{workload:10} {ours:>9.0f} {units[workload]:4}{ref:>9.0f}    {ratio:>6.2f}x   "
              f"{runs}")
    return summary


def make_random_file(path: Path, size: int) -> None:
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(left, 4 << 20)
            f.write(os.urandom(n))
            left -= n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    ap.add_argument("--size", default="256M", help="backing data size (default 256M)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=int, default=4, help="seconds per iscsi-perf run")
    ap.add_argument("--image", type=Path, default=None,
                    help="also compare an overlaybd config.v1.json / layer file")
    ap.add_argument("--json", type=Path, default=None, help="write the summary here")
    args = ap.parse_args()
    size = parse_size(args.size)
    summary = {}
    shm = Path("/dev/shm") if Path("/dev/shm").is_dir() else None
    with tempfile.TemporaryDirectory(prefix="obdfuse-bench-") as tmp, \
            tempfile.TemporaryDirectory(prefix="obdfuse-bench-", dir=shm) as scratch_dir:
        tmp_path, scratch = Path(tmp), Path(scratch_dir)
        backing = tmp_path / "backing.raw"
        make_random_file(backing, size)
        with open(backing, "rb") as f:  # both targets read from the page cache
            while f.read(8 << 20):
                pass
        with ObdfuseTarget("--raw", str(backing)) as obd, TgtTarget(backing) as tgt:
            res = measure({"obdfuse": obd.url, "tgt": tgt.url}, size, args.rounds, args.seconds,
                          scratch)
        summary["raw"] = report(f"same raw file ({size >> 20} MiB), obdfuse --raw vs tgt", res)
        if args.image:
            flat = tmp_path / "image.raw"
            with ObdfuseTarget(str(args.image)) as obd:
                subprocess.run(["qemu-img", "convert", "-O", "raw", obd.url, str(flat)],
                               check=True, capture_output=True, timeout=900)
                image_size = flat.stat().st_size
                with TgtTarget(flat) as tgt:
                    res = measure({"obdfuse": obd.url, "tgt": tgt.url}, image_size,
                                  args.rounds, args.seconds, scratch)
            summary["image"] = report(
                f"overlaybd image {args.image.name} via obdfuse vs its raw form via tgt", res)
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
