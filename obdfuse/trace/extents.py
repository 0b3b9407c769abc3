"""Resolve a prefetch list's paths to byte extents of the image (spec §7.2).

overlaybd reads the ext4 inside the merged image itself. We ask `debugfs`
(e2fsprogs) to do it, read-only and without bitmaps (`-c`), on the image
file the mount serves (`MOUNTPOINT/image`): nothing has to be loop-mounted,
and the metadata debugfs reads on the way (superblock, group descriptors,
inode tables, directories) is exactly what the start-up will need too, so
it is warmed as a side effect. FIEMAP on a loop-mounted copy would give the
same extents but needs the filesystem mounted first.

For each listed path (in order): its parent directories, then its inode
table block (`imap`) and its data blocks (`blocks`) as runs of neighbouring
blocks; a trailing `/` or `*` walks the directory tree below it (`ls -p`,
breadth first, one debugfs run per level). Paths that do not exist are
skipped with a log line, as overlaybd does. ext4 only (erofs: not yet).
"""

from __future__ import annotations

import logging
import re
import subprocess
import tempfile
from pathlib import PurePosixPath

from obdfuse.errors import ObdfuseError
from obdfuse.trace.format import PrefetchPath

log = logging.getLogger(__name__)

MAX_WALK_ENTRIES = 100_000
SUPERBLOCK_AREA = 64 * 1024  # superblock and group descriptors of small images
_IMAP = re.compile(r"located at block (\d+), offset 0x([0-9a-f]+)")
_LS_ENTRY = re.compile(r"^/(\d+)/([0-7]+)/\d+/\d+/(.*)/(\d*)/$")


def debugfs(image: str, commands: list[str], *, timeout: float = 300) -> list[tuple[str, str]]:
    """Run `debugfs -c` with `commands`; (command, its stdout) pairs in order."""
    with tempfile.NamedTemporaryFile("w", suffix=".debugfs") as script:
        script.write("\n".join(commands) + "\n")
        script.flush()
        try:
            proc = subprocess.run(["debugfs", "-c", "-f", script.name, image],
                                  capture_output=True, text=True, timeout=timeout,
                                  errors="surrogateescape")
        except FileNotFoundError:
            raise ObdfuseError("debugfs not found (install e2fsprogs) to resolve a "
                               "prefetch list") from None
        except subprocess.TimeoutExpired:
            raise ObdfuseError(f"debugfs on {image} did not finish within {timeout} s") from None
    if proc.returncode != 0 or "Bad magic number" in proc.stderr:
        reason = proc.stderr.strip().splitlines()[-1:] or [f"exit {proc.returncode}"]
        raise ObdfuseError(f"debugfs cannot read the ext4 in {image}: {reason[0]}")
    out: list[tuple[str, str]] = []
    for part in proc.stdout.split("debugfs: ")[1:]:
        cmd, _, text = part.partition("\n")
        out.append((cmd, text))
    return out


def _quote(path: str) -> str | None:
    if any(c in path for c in '"\n\r'):
        return None  # debugfs cannot take these; skip the path
    return f'"{path}"'


def _block_size(image: str) -> int:
    for _, text in debugfs(image, ["stats -h"]):
        m = re.search(r"^Block size:\s+(\d+)", text, re.M)
        if m:
            return int(m.group(1))
    raise ObdfuseError(f"{image}: debugfs did not report a block size (not ext4?)")


def _walk(image: str, roots: list[str], limit: int) -> list[str]:
    """Every path below `roots` (directories before their contents, breadth first)."""
    found: list[str] = []
    level = roots
    while level and len(found) < limit:
        quoted = [(p, q) for p in level if (q := _quote(p)) is not None]
        results = debugfs(image, [f"ls -p {q}" for _, q in quoted])
        nxt: list[str] = []
        for (parent, _), (_, text) in zip(quoted, results, strict=False):
            for line in text.splitlines():
                m = _LS_ENTRY.match(line.strip())
                if not m or m.group(3) in (".", ".."):
                    continue
                child = str(PurePosixPath(parent) / m.group(3))
                found.append(child)
                if int(m.group(2), 8) & 0o170000 == 0o040000:
                    nxt.append(child)
                if len(found) >= limit:
                    log.warning("trace: prefetch list walk stopped at %d entries", limit)
                    break
        level = nxt
    return found


def resolve_prefetch_list(image: str, entries: list[PrefetchPath], *,
                          walk_limit: int = MAX_WALK_ENTRIES) -> list[tuple[int, int]]:
    """Byte extents (offset, length) of the image that opening and reading the listed
    paths touches, in list order (see the module docstring). Blocking: run in a thread."""
    bs = _block_size(image)
    paths: list[str] = []
    seen: set[str] = set()

    def add(path: str) -> None:
        for parent in reversed(PurePosixPath(path).parents):
            if str(parent) not in seen:
                seen.add(str(parent))
                paths.append(str(parent))
        if path not in seen:
            seen.add(path)
            paths.append(path)

    for entry in entries:
        add(entry.path)
        if entry.walk:
            for child in _walk(image, [entry.path], walk_limit):
                add(child)
    commands: list[str] = []
    for path in paths:
        q = _quote(path)
        if q is not None:
            commands += [f"imap {q}", f"blocks {q}"]
    extents: list[tuple[int, int]] = [(0, SUPERBLOCK_AREA)]
    missing = 0
    for cmd, text in debugfs(image, commands) if commands else []:
        if cmd.startswith("imap "):
            m = _IMAP.search(text)
            if m:
                extents.append((int(m.group(1)) * bs, bs))
            else:
                missing += 1
            continue
        numbers = [int(x) for line in text.splitlines() if re.fullmatch(r"[\d ]+", line.strip())
                   for x in line.split()]
        extents += _block_runs(numbers, bs)
    if missing:
        log.info("trace: %d paths of the prefetch list are not in the image", missing)
    return extents


def _block_runs(blocks: list[int], bs: int) -> list[tuple[int, int]]:
    """Runs of consecutive block numbers as byte extents (in the given order)."""
    out: list[tuple[int, int]] = []
    start = prev = None
    for b in blocks:
        if start is not None and prev is not None and b == prev + 1:
            prev = b
            continue
        if start is not None and prev is not None:
            out.append((start * bs, (prev - start + 1) * bs))
        start = prev = b
    if start is not None and prev is not None:
        out.append((start * bs, (prev - start + 1) * bs))
    return out
