"""Record mode (spec §7.1, §7.2): log every read the Stack makes of its lower layers.

Like overlaybd, the recorder sits below the LSMT view of each lower layer,
so a record is (layer index, offset, count) in the decompressed layer-file
space. It works by swapping each `SealedLayer.blob` for a `RecordingBlob`
while recording and back afterwards: nothing is added to the read path when
no recording is on. Reads longer than `MAX_READ` are logged in pieces so
that every record is replayable with overlaybd's 1 MiB buffer.

`record_until_unlocked` is the §7.2 life cycle: `<path>.lock` exists while
recording; deleting it (polled each second) or closing the image stops the
recording, writes the trace to `path` and creates `<path>.ok`.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

import trio

from obdfuse.trace.format import MAX_READ, MAX_RECORDS, TraceRecord, encode_trace

if TYPE_CHECKING:
    from obdfuse.blob import Blob
    from obdfuse.layers.stack import Stack

log = logging.getLogger(__name__)

LOCK_SUFFIX = ".lock"
OK_SUFFIX = ".ok"
POLL_SECONDS = 1.0


class RecordingBlob:
    """A Blob that reports each complete read to a `TraceRecorder`, then passes it on."""

    def __init__(self, inner: Blob, layer: int, recorder: TraceRecorder) -> None:
        self.inner = inner
        self.layer = layer
        self.recorder = recorder
        self.name = inner.name

    @property
    def size(self) -> int:
        return self.inner.size

    async def pread(self, offset: int, length: int) -> bytes:
        data = await self.inner.pread(offset, length)
        if length and len(data) == length:  # only successful full reads, as upstream
            self.recorder.add(self.layer, offset, length)
        return data

    async def aclose(self) -> None:
        await self.inner.aclose()


class TraceRecorder:
    """Collects the lower-layer reads of one Stack while started."""

    def __init__(self, stack: Stack, *, max_records: int = MAX_RECORDS) -> None:
        self.stack = stack
        self.max_records = max_records
        self.records: list[TraceRecord] = []
        self.dropped = 0
        self.active = False

    def start(self) -> None:
        """Begin recording (synchronous: no read issued after this call is missed)."""
        if self.active:
            return
        for i, layer in enumerate(self.stack.lowers):
            layer.blob = RecordingBlob(layer.blob, i, self)
        self.active = True

    def stop(self) -> list[TraceRecord]:
        """Stop recording and restore the layers' blobs; returns the records."""
        if self.active:
            for layer in self.stack.lowers:
                if isinstance(layer.blob, RecordingBlob) and layer.blob.recorder is self:
                    layer.blob = layer.blob.inner
            self.active = False
        return self.records

    def add(self, layer: int, offset: int, length: int) -> None:
        if not self.active:
            return  # a read that started before stop() returned after it
        end = offset + length
        while offset < end:
            if len(self.records) >= self.max_records:
                if not self.dropped:
                    log.warning("trace: %d records recorded, dropping further reads",
                                self.max_records)
                self.dropped += 1
                return
            count = min(MAX_READ, end - offset)
            self.records.append(TraceRecord(layer, offset, count))
            offset += count

    def stats(self) -> dict[str, object]:
        return {"recording": self.active, "records": len(self.records),
                "bytes": sum(r.count for r in self.records), "dropped": self.dropped}


def write_trace_file(path: Path, records: list[TraceRecord]) -> None:
    """Write a trace atomically (temp file, fsync, rename)."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            fh.write(encode_trace(records))
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def lock_path(path: Path) -> Path:
    return path.with_name(path.name + LOCK_SUFFIX)


def ok_path(path: Path) -> Path:
    return path.with_name(path.name + OK_SUFFIX)


def create_lock(path: Path) -> None:
    """Mark a recording as running: `<path>.lock` exists, no stale `<path>.ok`."""
    ok_path(path).unlink(missing_ok=True)
    lock_path(path).touch()


async def record_until_unlocked(recorder: TraceRecorder, path: Path, *,
                                poll: float = POLL_SECONDS, locked: bool = False) -> None:
    """Run the §7.2 record life cycle; the recorder must already be started.

    Creates `<path>.lock` (unless `locked`: the caller did, when it started the
    recorder) and returns when it is deleted; on cancellation (the image is
    being closed) the trace is still written.
    """
    lock = lock_path(path)
    if not locked:
        create_lock(path)
    log.info("trace: recording into %s (delete %s to stop)", path, lock)
    try:
        while lock.exists():
            await trio.sleep(poll)
    finally:
        records = recorder.stop()
        try:
            write_trace_file(path, records)
            log.info("trace: wrote %d records (%d bytes of reads) to %s", len(records),
                     sum(r.count for r in records), path)
        except OSError as exc:
            log.error("trace: cannot write %s: %s", path, exc)
        else:
            ok_path(path).touch()
        finally:
            lock.unlink(missing_ok=True)
