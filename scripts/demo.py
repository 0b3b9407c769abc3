"""The main job on a sample the demo builds itself: a ZFile round trip of an ext4 image.

Makes a 64 MiB ext4 image (mkfs.ext4), compresses it with `obdfuse zfile compress`
(LZ4 and zstd), verifies, describes and decompresses it, and checks that the bytes
come back identical. (A mount of an overlaybd image replaces this once it exists.)
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path


def run(*args: str) -> None:
    print("$ obdfuse " + " ".join(args), flush=True)
    subprocess.run([sys.executable, "-m", "obdfuse", *args], check=True)


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="obdfuse-demo-") as tmp:
        work = Path(tmp)
        image = work / "disk.img"
        with open(image, "wb") as f:
            f.truncate(64 << 20)
        if shutil.which("mkfs.ext4"):
            subprocess.run(["mkfs.ext4", "-q", "-F", "-L", "demo", str(image)], check=True)
        else:  # pragma: no cover - setup.sh installs e2fsprogs
            with open(image, "r+b") as f:
                f.write(b"obdfuse demo data\n" * 100_000)
        print(f"made {image.name}: 64 MiB ext4 image, sha256 {sha256(image)[:16]}...")
        for algorithm, block_size in (("lz4", "4K"), ("zstd", "16K")):
            packed = work / f"disk.{algorithm}.zfile"
            back = work / f"disk.{algorithm}.img"
            run(
                "zfile",
                "compress",
                "--algorithm",
                algorithm,
                "--block-size",
                block_size,
                str(image),
                str(packed),
            )
            run("zfile", "verify", str(packed))
            run("zfile", "info", str(packed))
            run("zfile", "decompress", str(packed), str(back))
            if sha256(back) != sha256(image):
                sys.exit(f"demo: {back.name} differs from the original")
            print(f"{back.name}: identical to the original\n")
        print("demo OK")


if __name__ == "__main__":
    main()
