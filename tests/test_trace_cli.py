"""`obdfuse trace info`: text and JSON descriptions, one-line errors on bad files."""

from __future__ import annotations

import json

from click.testing import CliRunner

from obdfuse.cli import main
from obdfuse.trace.format import TraceRecord, encode_trace


def run(*args):
    return CliRunner().invoke(main, list(args))


def test_info_of_a_trace(tmp_path):
    path = tmp_path / "t.trace"
    path.write_bytes(encode_trace([TraceRecord(0, 0, 4096), TraceRecord(0, 2048, 4096),
                                   TraceRecord(1, 1 << 20, 512)]))
    doc = json.loads(run("trace", "info", "--json", str(path)).output)
    assert doc["format"] == "trace" and doc["records"] == 3 and doc["bytes"] == 8704
    assert doc["layers"]["0"]["unique_bytes"] == 6144  # overlapping reads counted once
    assert doc["layers"]["1"] == {"records": 1, "bytes": 512, "unique_bytes": 512,
                                  "min_offset": 1 << 20, "max_end": (1 << 20) + 512}
    text = run("trace", "info", str(path)).output
    assert "3 records, 8704 bytes read" in text and "layer 1: 1 records" in text


def test_info_of_list_and_empty(tmp_path):
    plist = tmp_path / "list"
    plist.write_text("/usr/bin/python3\n/usr/lib/*\n")
    assert "/usr/lib/" in run("trace", "info", str(plist)).output
    empty = tmp_path / "empty"
    empty.touch()
    assert "empty (mode on mount: record)" in run("trace", "info", str(empty)).output


def test_bad_trace_is_one_line_error(tmp_path):
    path = tmp_path / "t.trace"
    path.write_bytes(encode_trace([TraceRecord(0, 0, 4096)])[:-1])
    res = run("trace", "info", str(path))
    assert res.exit_code == 1
    assert res.output.strip().startswith("obdfuse: error:") and "truncated" in res.output
    assert len(res.output.strip().splitlines()) == 1
