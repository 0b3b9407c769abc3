"""Shared file primitives: whole reads/writes, atomic outputs (obdfuse/fileio.py)."""

from __future__ import annotations

import os

import pytest
import trio

from obdfuse.blob import FileBlob
from obdfuse.device import RawFileDevice
from obdfuse.errors import FormatError
from obdfuse.fileio import atomic_output, pread_exact, pwrite_all


def test_pwrite_all_continues_after_short_writes(tmp_path, monkeypatch):
    path = tmp_path / "f"
    path.write_bytes(bytes(64))
    real = os.pwrite
    calls = []

    def short_pwrite(fd, data, offset):
        calls.append(offset)
        return real(fd, bytes(data)[:5], offset)  # at most 5 bytes per call

    monkeypatch.setattr(os, "pwrite", short_pwrite)
    fd = os.open(path, os.O_RDWR)
    try:
        pwrite_all(fd, b"0123456789abcdef", 8)
    finally:
        os.close(fd)
    monkeypatch.undo()
    assert path.read_bytes()[8:24] == b"0123456789abcdef"
    assert calls == [8, 13, 18, 23]


def test_raw_device_writes_survive_short_writes(tmp_path, monkeypatch):
    path = tmp_path / "disk"
    path.write_bytes(bytes(4096))
    real = os.pwrite
    monkeypatch.setattr(os, "pwrite", lambda fd, data, off: real(fd, bytes(data)[:100], off))
    dev = RawFileDevice(path, read_only=False)
    trio.run(dev.pwrite, 512, b"x" * 1024)
    trio.run(dev.aclose)
    monkeypatch.undo()
    assert path.read_bytes()[512:1536] == b"x" * 1024


def test_reads_of_a_file_that_shrank_fail_instead_of_returning_fewer_bytes(tmp_path):
    path = tmp_path / "disk"
    path.write_bytes(b"a" * (1 << 20))
    blob = FileBlob(path)
    dev = RawFileDevice(path)
    os.truncate(path, 4096)  # shrinks under the open handles
    try:
        with pytest.raises(FormatError, match="shrank"):
            trio.run(blob.pread, 0, 8192)
        with pytest.raises(FormatError, match="shrank"):
            trio.run(dev.pread, 0, 8192)  # small read, in the event loop
        with pytest.raises(FormatError, match="shrank"):
            trio.run(dev.pread, 0, 512 * 1024)  # large read, in a worker thread
    finally:
        blob.close()
        trio.run(dev.aclose)
    fd = os.open(path, os.O_RDONLY)
    try:
        assert pread_exact(fd, 4096, 0, name="disk") == b"a" * 4096
    finally:
        os.close(fd)


def test_atomic_output_replaces_only_on_success(tmp_path):
    target = tmp_path / "out"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic_output(target) as f:
        f.write(b"partial")
        raise RuntimeError("boom")
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temp file left
    with atomic_output(target) as f:
        f.write(b"new")
    assert target.read_bytes() == b"new"
    assert target.stat().st_mode & 0o777 == 0o644
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
