"""Replay a trace as prefetch: warm the caches with what a start-up will read (spec §7.1).

Planning turns the records (layer, offset, count in the decompressed
layer-file space) into cache fills. When a layer's bytes come from a
`CachedBlob` (a remote image), each record is mapped down through the
layer's wrappers (hot-block cache → ZFile jump table → tar slice) to the
stored byte range it needs, then to cache chunks; the missing chunks of each
blob are merged into runs of neighbouring chunks (up to `max_request` bytes),
so the registry sees few, large range requests instead of one per record.
Runs are issued in the order the start-up first needed them. Layers with no
cache below (local files) are read in pieces of at most 1 MiB, which warms
the page cache and the hot-block cache.

Running: `concurrency` workers (default 16) take fills in order, with at
most `window` bytes of registry fills in flight (default 128 MiB, i.e. no
limit beyond the workers). A small window keeps a slow link delivering in
need order, but measured (scripts/bench/coldstart.py) it did not help on a
100 Mbit/s link and cost 40 % on a 1 Gbit/s, 50 ms one, where parallel
8 MiB requests fill the bandwidth-delay product. Prefetch yields to demand
reads: while a demand fetch is in flight on the cache, at most
`busy_concurrency` prefetch requests start. A failing fill is logged and
counted, never fatal; the whole replay is cancellable (it runs in the
daemon's nursery and stops with the mount).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from obdfuse.blob import SliceBlob
from obdfuse.errors import ObdfuseError
from obdfuse.trace.format import HEADER_SIZE, MAX_READ, TraceRecord, decode_header, decode_trace

if TYPE_CHECKING:
    from obdfuse.layers.stack import Stack

log = logging.getLogger(__name__)

DEFAULT_CONCURRENCY = 16
DEFAULT_BUSY_CONCURRENCY = 4
DEFAULT_MAX_REQUEST = 8 << 20
DEFAULT_WINDOW = 128 << 20


def read_trace_file(path: Path, *, layers: int | None = None) -> list[TraceRecord]:
    """Load and verify a binary trace; the header is checked against the file size first."""
    with open(path, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        decode_header(fh.read(HEADER_SIZE), size, where=str(path))
        fh.seek(0)
        data = fh.read()
    return decode_trace(data, where=str(path), layers=layers)


@dataclass
class Fill:
    """One planned prefetch: `length` bytes at `offset` of `target`.

    `cached` fills call `target.prefetch` (a CachedBlob: fetch into the cache,
    no read); others `target.pread` (a layer blob)."""

    target: Any
    offset: int
    length: int
    order: int
    cached: bool


@dataclass
class ReplayStats:
    """Progress of one replay, published in the stat file."""

    source: str = ""
    state: str = "planning"
    records: int = 0
    skipped_records: int = 0
    fills: int = 0
    planned_bytes: int = 0
    fills_done: int = 0
    bytes_done: int = 0
    chunks_missing: int = 0  # chunks the fills found missing (= fetched by prefetch)
    errors: int = 0
    seconds: float = 0.0
    _started: float = field(default=0.0, repr=False)

    def as_dict(self) -> dict[str, object]:
        out = {k: v for k, v in vars(self).items() if not k.startswith("_")}
        if self.state == "running":
            out["seconds"] = round(time.monotonic() - self._started, 3)
        return out


def stored_range(blob: Any, offset: int, length: int) -> tuple[Any, int, int] | None:
    """Map a range of a layer blob down to the CachedBlob bytes holding it, or None.

    Walks the wrappers a remote layer is built of: RecordingBlob/BlockCachedBlob
    (same space, `.inner`), ZFileReader (blocks → stored bytes via its jump table),
    SliceBlob (tar payload: shift by `.start`), down to a blob with `prefetch`.
    """
    from obdfuse.cache.memory import BlockCachedBlob
    from obdfuse.trace.recorder import RecordingBlob
    from obdfuse.zfile.reader import ZFileReader

    end = min(offset + length, blob.size)
    if end <= offset:
        return None
    for _ in range(16):  # wrapper chains are short; never loop forever
        if hasattr(blob, "prefetch") and hasattr(blob, "chunk_present"):
            return blob, offset, end - offset
        if isinstance(blob, RecordingBlob | BlockCachedBlob):
            blob = blob.inner
        elif isinstance(blob, ZFileReader):
            if blob.n_blocks == 0:
                return None
            shift = blob.block_size.bit_length() - 1
            first = offset >> shift
            last = min((end - 1) >> shift, blob.n_blocks - 1)
            offsets = blob.table.offsets
            offset, end = offsets[first], offsets[last + 1]
            blob = blob.inner
        elif isinstance(blob, SliceBlob):
            offset, end = offset + blob.start, end + blob.start
            blob = blob.inner
        else:
            return None
    return None


def plan_fills(stack: Stack, records: Iterable[TraceRecord], stats: ReplayStats, *,
               max_request: int = DEFAULT_MAX_REQUEST) -> list[Fill]:
    """Turn records into fills: coalesced chunk runs for cached layers, ≤ 1 MiB reads else."""
    first_seen: dict[tuple[int, int], int] = {}  # (id(blob), chunk) → record order
    blobs: dict[int, Any] = {}
    direct: list[Fill] = []
    for order, rec in enumerate(records):
        stats.records += 1
        if rec.layer >= len(stack.lowers) or rec.count == 0:
            stats.skipped_records += 1
            continue
        blob = stack.lowers[rec.layer].blob
        found = stored_range(blob, rec.offset, rec.count)
        if found is None:
            _add_direct(direct, blob, rec.offset, min(rec.count, max(0, blob.size - rec.offset)),
                        order)
            continue
        cached, off, length = found
        cs = cached.chunk_size
        blobs[id(cached)] = cached
        for chunk in range(off // cs, (off + length - 1) // cs + 1):
            key = (id(cached), chunk)
            if key not in first_seen and not cached.chunk_present(chunk):
                first_seen[key] = order
    fills = [f for f in direct if f.length > 0]
    by_blob: dict[int, list[int]] = {}
    for blob_id, chunk in first_seen:
        by_blob.setdefault(blob_id, []).append(chunk)
    for blob_id, chunks in by_blob.items():
        cached = blobs[blob_id]
        cs = cached.chunk_size
        run_max = max(1, max_request // cs)
        chunks.sort()
        run = [chunks[0]]
        for chunk in [*chunks[1:], None]:
            if chunk is not None and chunk == run[-1] + 1 and len(run) < run_max:
                run.append(chunk)
                continue
            order = min(first_seen[(blob_id, c)] for c in run)
            start = run[0] * cs
            length = min((run[-1] + 1) * cs, cached.size) - start
            fills.append(Fill(cached, start, length, order, cached=True))
            if chunk is not None:
                run = [chunk]
    fills.sort(key=lambda f: f.order)
    stats.fills = len(fills)
    stats.planned_bytes = sum(f.length for f in fills)
    return fills


def _add_direct(out: list[Fill], blob: Any, offset: int, count: int, order: int) -> None:
    """Append ≤ MAX_READ pieces, extending the previous piece when contiguous."""
    end = offset + count
    while offset < end:
        prev = out[-1] if out else None
        if (prev is not None and prev.target is blob and prev.offset + prev.length == offset
                and prev.length < MAX_READ):
            take = min(MAX_READ - prev.length, end - offset)
            prev.length += take
        else:
            take = min(MAX_READ, end - offset)
            out.append(Fill(blob, offset, take, order, cached=False))
        offset += take


async def run_fills(fills: list[Fill], stats: ReplayStats, *,
                    concurrency: int = DEFAULT_CONCURRENCY,
                    window: int = DEFAULT_WINDOW,
                    busy_concurrency: int = DEFAULT_BUSY_CONCURRENCY) -> None:
    """Execute the fills in order with bounded concurrency and bytes in flight,
    yielding to demand reads."""
    if concurrency < 1:
        raise ObdfuseError(f"prefetch concurrency must be at least 1, not {concurrency}")
    pending = iter(fills)
    inflight = 0
    inflight_bytes = 0
    reported: set[str] = set()
    stats.state = "running"
    stats._started = time.monotonic()

    def demand_busy(fill: Fill) -> bool:
        cache = getattr(fill.target, "cache", None)
        return bool(getattr(cache, "demand_active", 0))

    def must_wait(fill: Fill) -> bool:
        if not inflight:
            return False
        if fill.cached and inflight_bytes + fill.length > window:
            return True
        return demand_busy(fill) and inflight >= busy_concurrency

    async def worker() -> None:
        nonlocal inflight, inflight_bytes
        for fill in pending:
            while must_wait(fill):
                await trio.sleep(0.002)
            inflight += 1
            inflight_bytes += fill.length if fill.cached else 0
            try:
                if fill.cached:
                    missing = await fill.target.prefetch(fill.offset, fill.length)
                    stats.chunks_missing += missing
                else:
                    await fill.target.pread(fill.offset, fill.length)
                stats.fills_done += 1
                stats.bytes_done += fill.length
            except (ObdfuseError, OSError) as exc:
                stats.errors += 1
                key = f"{type(exc).__name__}: {exc}"
                if key not in reported and len(reported) < 100:
                    reported.add(key)
                    log.warning("trace: prefetch of %d bytes at %d of %s failed: %s",
                                fill.length, fill.offset, fill.target.name, exc)
            finally:
                inflight -= 1
                inflight_bytes -= fill.length if fill.cached else 0

    try:
        async with trio.open_nursery() as nursery:
            for _ in range(min(concurrency, max(1, len(fills)))):
                nursery.start_soon(worker)
    except BaseException:
        stats.state = "cancelled"
        raise
    finally:
        stats.seconds = round(time.monotonic() - stats._started, 3)
    stats.state = "done"


async def replay_records(stack: Stack, records: list[TraceRecord], stats: ReplayStats, *,
                         concurrency: int = DEFAULT_CONCURRENCY,
                         max_request: int = DEFAULT_MAX_REQUEST,
                         window: int = DEFAULT_WINDOW) -> None:
    """Plan and run the prefetch of `records` against `stack`."""
    fills = plan_fills(stack, records, stats, max_request=max_request)
    log.info("trace: replaying %d records as %d fills (%d bytes) from %s", stats.records,
             len(fills), stats.planned_bytes, stats.source)
    await run_fills(fills, stats, concurrency=concurrency, window=window)
    log.info("trace: prefetch done in %.2f s: %d fills, %d chunks fetched, %d errors",
             stats.seconds, stats.fills_done, stats.chunks_missing, stats.errors)


def records_for_extents(stack: Stack, extents: Iterable[tuple[int, int]]) -> list[TraceRecord]:
    """Image-space extents (e.g. files of a prefetch list) as lower-layer records."""
    from obdfuse.layers.stack import UPPER_TAG

    out: list[TraceRecord] = []
    for offset, length in extents:
        pos, end = offset, offset + length
        while pos < end:  # ≤ 1 MiB image pieces, as overlaybd queues them
            n = min(MAX_READ, end - pos)
            for source, off, count in stack.layer_extents(pos, n):
                if source != UPPER_TAG:
                    out.append(TraceRecord(source, off, count))
            pos += n
    return out

