"""Traces beside a mount: which mode applies (spec §7.2, §7.3) and the task that runs it.

`TraceSettings` comes from the mount options (`--record-trace`,
`--replay-trace`) or from an image config (`recordTracePath`,
`accelerationLayer`) and is checked before the image is opened.
`TraceService.attach(device)` runs right after the image is opened: a
recording begins there, so no read is missed. `TraceService.run(device)` is
a service of the daemon's nursery, started once the mount is live: it waits
for the end of a recording, or replays (resolving a prefetch list first),
and is cancelled with the mount. Progress is published in the stat file under "trace".
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from obdfuse.errors import FormatError, ObdfuseError
from obdfuse.trace.format import TraceMode, classify, read_prefetch_list
from obdfuse.trace.recorder import TraceRecorder, create_lock, record_until_unlocked
from obdfuse.trace.replay import (
    DEFAULT_CONCURRENCY,
    DEFAULT_MAX_REQUEST,
    DEFAULT_WINDOW,
    ReplayStats,
    read_trace_file,
    records_for_extents,
    replay_records,
)

if TYPE_CHECKING:
    from obdfuse.layers.config import ImageConfig

log = logging.getLogger(__name__)

ACCEL_TRACE_NAME = "trace"  # the file inside an acceleration layer's dir (§7.3)


def trace_mode(path: Path) -> TraceMode:
    """The §7.2 mode of `path` from its current state on disk."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return TraceMode.DISABLED
    with open(path, "rb") as fh:
        head = fh.read(4)
    return classify(size, head)


@dataclass
class TraceSettings:
    """What to do with traces for one mount: record into `path`, or replay it."""

    mode: TraceMode = TraceMode.DISABLED
    path: Path | None = None
    concurrency: int = DEFAULT_CONCURRENCY
    max_request: int = DEFAULT_MAX_REQUEST
    window: int = DEFAULT_WINDOW

    @property
    def enabled(self) -> bool:
        return self.mode is not TraceMode.DISABLED

    @classmethod
    def for_record(cls, path: Path, **kw: Any) -> TraceSettings:
        """`--record-trace PATH`: record into PATH (created empty when missing)."""
        path = Path(os.path.abspath(path))
        if path.exists() and path.stat().st_size:
            raise ObdfuseError(f"{path}: trace file exists and is not empty (remove it to "
                               "record again, or replay it with --replay-trace)")
        if not path.parent.is_dir():
            raise ObdfuseError(f"{path.parent}: no such directory for the trace file")
        path.touch()
        return cls(TraceMode.RECORD, path, **kw)

    @classmethod
    def for_replay(cls, path: Path, **kw: Any) -> TraceSettings:
        """`--replay-trace PATH`: replay a binary trace or a prefetch list."""
        path = Path(os.path.abspath(path))
        mode = trace_mode(path)
        if mode is TraceMode.DISABLED:
            raise ObdfuseError(f"{path}: no such trace file")
        if mode is TraceMode.RECORD:
            raise ObdfuseError(f"{path}: the trace file is empty (nothing to replay)")
        return cls(mode, path, **kw)

    @classmethod
    def from_config(cls, config: ImageConfig, **kw: Any) -> TraceSettings:
        """overlaybd's `recordTracePath` (mode by file state) and `accelerationLayer`."""
        raw = config.raw
        accel = raw.get("accelerationLayer", False)
        record = raw.get("recordTracePath") or None
        if not isinstance(accel, bool):
            raise FormatError(f"{config.path}: 'accelerationLayer' must be true or false")
        if record is not None and not isinstance(record, str):
            raise FormatError(f"{config.path}: 'recordTracePath' must be a string")
        if accel and record:
            raise FormatError(f"{config.path}: 'accelerationLayer' and 'recordTracePath' "
                              "cannot be used together")
        if accel:
            if not config.lowers:
                return cls(**kw)
            layer = config.lowers[-1]
            folder = layer.dir if layer.dir is not None else (
                layer.file.parent if layer.file is not None else None)
            if folder is None:
                raise FormatError(f"{config.path}: the acceleration layer (last lower) "
                                  "has no local dir holding its trace")
            path = folder / ACCEL_TRACE_NAME
            mode = trace_mode(path)
            if mode is TraceMode.RECORD:  # an empty trace in an accel layer: nothing to do
                mode = TraceMode.DISABLED
            return cls(mode, path, **kw)
        if record:
            path = Path(record)
            path = path if path.is_absolute() else config.path.parent / path
            return cls(trace_mode(path), path, **kw)
        return cls(**kw)

    def describe(self) -> str:
        return f"{self.mode.value} {self.path}" if self.enabled else "disabled"


class TraceService:
    """Runs the trace mode of one mount (see module docstring)."""

    def __init__(self, settings: TraceSettings, *, image_file: Path | None = None) -> None:
        """`image_file`: the served image (MOUNTPOINT/image), read by debugfs for lists."""
        self.settings = settings
        self.image_file = image_file
        self.recorder: TraceRecorder | None = None
        self.replay = ReplayStats(source=str(settings.path or ""))
        self.error: str | None = None

    def attach(self, device: Any) -> None:
        """Called as soon as the image is open: a recording starts here."""
        if not hasattr(device, "lowers"):
            raise ObdfuseError("traces need an overlaybd image (a layer stack)")
        if self.settings.mode is TraceMode.RECORD:
            assert self.settings.path is not None
            create_lock(self.settings.path)  # visible before the mount reports ready
            self.recorder = TraceRecorder(device)
            self.recorder.start()

    async def run(self, device: Any) -> None:
        """The mode's task in the daemon's nursery (cancelled when the mount stops)."""
        mode, path = self.settings.mode, self.settings.path
        assert path is not None
        if self.recorder is not None:
            try:
                await record_until_unlocked(self.recorder, path, locked=True)
            except OSError as exc:  # e.g. the lock file cannot be created: keep serving
                self.recorder.stop()
                self.error = f"recording into {path} failed: {exc}"
                log.error("trace: %s", self.error)
        elif mode in (TraceMode.REPLAY, TraceMode.PREFETCH_LIST):
            await self._replay(device, path, mode, self.image_file)

    async def _replay(self, stack: Any, path: Path, mode: TraceMode,
                      image_file: Path | None) -> None:
        try:
            if mode is TraceMode.REPLAY:
                records = await trio.to_thread.run_sync(
                    lambda: read_trace_file(path, layers=len(stack.lowers)))
            else:
                records = await self._resolve_list(stack, path, image_file)
            await replay_records(stack, records, self.replay,
                                 concurrency=self.settings.concurrency,
                                 max_request=self.settings.max_request,
                                 window=self.settings.window)
        except (ObdfuseError, OSError) as exc:
            self.error = str(exc)
            self.replay.state = "failed"
            log.error("trace: replay of %s failed: %s", path, exc)

    async def _resolve_list(self, stack: Any, path: Path, image_file: Path | None):
        from obdfuse.trace.extents import resolve_prefetch_list

        if image_file is None:
            raise ObdfuseError("a prefetch list needs the mounted image file to resolve paths")
        entries = read_prefetch_list(str(path))
        self.replay.state = "resolving"
        extents = await trio.to_thread.run_sync(
            lambda: resolve_prefetch_list(str(image_file), entries), abandon_on_cancel=True)
        return records_for_extents(stack, extents)

    def stats(self) -> dict[str, object]:
        out: dict[str, object] = {"mode": self.settings.mode.value,
                                  "path": str(self.settings.path or "")}
        if self.recorder is not None:
            out.update(self.recorder.stats())
        elif self.settings.mode in (TraceMode.REPLAY, TraceMode.PREFETCH_LIST):
            out["replay"] = self.replay.as_dict()
        if self.error:
            out["error"] = self.error
        return {"trace": out}
