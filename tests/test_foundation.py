"""The package skeleton: Blob implementations, size parsing, the CLI's error path."""

from __future__ import annotations

import subprocess
import sys

import pytest
import trio

from obdfuse.blob import BytesBlob, FileBlob, SliceBlob
from obdfuse.cli.params import parse_size
from obdfuse.errors import FormatError


def test_parse_size() -> None:
    assert parse_size("4096") == 4096
    assert parse_size("4K") == 4096
    assert parse_size("64G") == 64 << 30
    assert parse_size("1GiB") == 1 << 30
    with pytest.raises(ValueError):
        parse_size("lots")


def test_blobs_clamp_at_end(tmp_path) -> None:
    p = tmp_path / "f"
    p.write_bytes(bytes(range(100)))

    async def main() -> None:
        fb = FileBlob(p)
        assert fb.size == 100
        assert await fb.pread(90, 20) == bytes(range(90, 100))
        assert await fb.pread(100, 5) == b""
        sb = SliceBlob(fb, 10, 20)
        assert await sb.pread(15, 10) == bytes(range(25, 30))
        with pytest.raises(FormatError):
            SliceBlob(fb, 90, 20)
        bb = BytesBlob(b"abc")
        assert await bb.pread(1, 9) == b"bc"
        await fb.aclose()

    trio.run(main)


def test_cli_reports_errors_in_one_line() -> None:
    r = subprocess.run(
        [sys.executable, "-m", "obdfuse", "--help"], capture_output=True, text=True, check=True
    )
    assert "zfile" in r.stdout
