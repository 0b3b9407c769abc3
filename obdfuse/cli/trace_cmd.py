"""`obdfuse trace info`: describe a trace file (binary trace or prefetch list)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from obdfuse.trace.format import TraceMode, TraceRecord, read_prefetch_list
from obdfuse.trace.replay import read_trace_file
from obdfuse.trace.session import trace_mode


@click.group("trace")
def trace() -> None:
    """I/O traces: record with `obdfuse mount --record-trace`, replay with --replay-trace."""


def describe_records(records: list[TraceRecord]) -> dict[str, object]:
    """Totals and per-layer figures of a trace."""
    layers: dict[int, dict[str, int]] = {}
    seen: dict[int, set[tuple[int, int]]] = {}
    for r in records:
        entry = layers.setdefault(r.layer, {"records": 0, "bytes": 0, "unique_bytes": 0,
                                            "min_offset": r.offset, "max_end": 0})
        entry["records"] += 1
        entry["bytes"] += r.count
        entry["min_offset"] = min(entry["min_offset"], r.offset)
        entry["max_end"] = max(entry["max_end"], r.offset + r.count)
        seen.setdefault(r.layer, set()).add((r.offset, r.count))
    for layer, ranges in seen.items():
        layers[layer]["unique_bytes"] = _union_bytes(ranges)
    return {"records": len(records), "bytes": sum(r.count for r in records),
            "writes": sum(1 for r in records if r.op != ord("R")),
            "layers": {str(k): v for k, v in sorted(layers.items())}}


def _union_bytes(ranges: set[tuple[int, int]]) -> int:
    total, end = 0, -1
    for off, count in sorted(ranges):
        if off + count <= end:
            continue
        total += off + count - max(off, end)
        end = off + count
    return total


@trace.command("info")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.argument("file", type=click.Path(path_type=Path, dir_okay=False, exists=True))
def info(file: Path, as_json: bool) -> None:
    """Describe FILE: a binary trace (records per layer), a prefetch list, or empty."""
    mode = trace_mode(file)
    doc: dict[str, object] = {"file": str(file), "mode": mode.value}
    if mode is TraceMode.REPLAY:
        doc["format"] = "trace"
        doc.update(describe_records(read_trace_file(file)))
    elif mode is TraceMode.PREFETCH_LIST:
        doc["format"] = "prefetch-list"
        entries = read_prefetch_list(str(file))
        doc["paths"] = [e.path + ("/" if e.walk else "") for e in entries]
    else:
        doc["format"] = "empty"
    if as_json:
        click.echo(json.dumps(doc, indent=2))
        return
    click.echo(f"{file}: {doc['format']} (mode on mount: {mode.value})")
    if doc["format"] == "trace":
        click.echo(f"  {doc['records']} records, {doc['bytes']} bytes read")
        for layer, e in doc["layers"].items():  # type: ignore[union-attr]
            click.echo(f"  layer {layer}: {e['records']} records, {e['bytes']} bytes "
                       f"({e['unique_bytes']} distinct), offsets {e['min_offset']}.."
                       f"{e['max_end']}")
    elif doc["format"] == "prefetch-list":
        for p in doc["paths"]:  # type: ignore[union-attr]
            click.echo(f"  {p}")
