"""Flat segment indexes: overlay, log resolution, stacking, lookup (spec §3.5, §3.8)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from obdfuse.layers.index import (
    MutableSegmentIndex,
    SegmentIndex,
    merge_stack,
    overlay,
    resolve_log,
)
from obdfuse.layers.segment import Segments, make_segments

SPACE = 300

log_entries = st.lists(
    st.tuples(st.integers(0, SPACE - 1), st.integers(1, 80), st.booleans()), max_size=60
)


def build_log(items) -> Segments:
    """Log entries [offset, len) with moffset = 1000*i + 8 so the writer is recoverable."""
    offs, lens, moffs, zer = [], [], [], []
    for i, (off, ln, z) in enumerate(items):
        ln = min(ln, SPACE - off)
        offs.append(off)
        lens.append(ln)
        moffs.append(1000 * i + 8)
        zer.append(z)
    return make_segments(offs, lens, moffs, zer)


def painted(segs: Segments) -> list:
    """Per-sector (zeroed, moffset-for-that-sector) or None: what a lookup must yield."""
    out: list = [None] * SPACE
    for off, ln, mo, z in zip(
        segs.offset.tolist(),
        segs.length.tolist(),
        segs.moffset.tolist(),
        segs.zeroed.tolist(),
        strict=True,
    ):
        for k in range(ln):
            out[off + k] = ("z",) if z else ("d", mo + k)
    return out


def model_log(items) -> list:
    out: list = [None] * SPACE
    for i, (off, ln, z) in enumerate(items):
        ln = min(ln, SPACE - off)
        for k in range(ln):
            out[off + k] = ("z",) if z else ("d", 1000 * i + 8 + k)
    return out


def assert_flat(segs: Segments) -> None:
    assert (segs.length > 0).all()
    assert (segs.end[:-1] <= segs.offset[1:]).all()


@settings(max_examples=200)
@given(log_entries)
def test_resolve_log_later_wins(items):
    segs = resolve_log(build_log(items))
    assert_flat(segs)
    assert painted(segs) == model_log(items)


@settings(max_examples=100)
@given(log_entries)
def test_mutable_index_matches_resolve(items):
    idx = MutableSegmentIndex()
    idx.FOLD_AT = 7  # exercise folding
    log = build_log(items)
    for off, ln, mo, z in zip(
        log.offset.tolist(),
        log.length.tolist(),
        log.moffset.tolist(),
        log.zeroed.tolist(),
        strict=True,
    ):
        if ln:
            idx.insert(off, ln, mo, z)
    flat = idx.flat().segs
    assert_flat(flat)
    assert painted(flat) == model_log([it for it in items if min(it[1], SPACE - it[0])])


def test_resolve_log_across_paint_chunks(monkeypatch):
    import obdfuse.layers.index as index_mod

    monkeypatch.setattr(index_mod, "_PAINT_CHUNK", 3)
    items = [(i * 7 % 250, 30, i % 5 == 0) for i in range(40)]
    segs = resolve_log(build_log(items))
    assert_flat(segs)
    assert painted(segs) == model_log(items)


@given(log_entries, log_entries)
def test_overlay_top_wins(top_items, bottom_items):
    top = resolve_log(build_log(top_items))
    bottom = resolve_log(build_log(bottom_items))
    out = overlay(top, bottom)
    assert_flat(out)
    t, b = painted(top), painted(bottom)
    assert painted(out) == [x if x is not None else y for x, y in zip(t, b, strict=True)]


@given(st.lists(log_entries, min_size=1, max_size=6))
def test_merge_stack_tags_each_piece_with_its_layer(layers):
    flats = [resolve_log(build_log(items)).with_tag(i) for i, items in enumerate(layers)]
    merged = merge_stack(list(reversed(flats)))  # top first
    assert_flat(merged.segs)
    expect: list = [None] * SPACE
    for i, f in enumerate(flats):  # bottom to top: later overrides
        for s, v in enumerate(painted(f)):
            if v is not None:
                expect[s] = (i, v)
    got: list = [None] * SPACE
    for j in range(len(merged)):
        one = merged.segs.take(slice(j, j + 1))
        tag = int(one.tag[0])
        for s, v in enumerate(painted(one)):
            if v is not None:
                got[s] = (tag, v)
    assert got == expect


def test_find_and_clip():
    idx = SegmentIndex(make_segments([10, 50, 100], [20, 10, 5], [8, 100, 200]))
    assert idx.find(0, 10) == (0, 0)
    assert idx.find(0, 11) == (0, 1)
    assert idx.find(30, 50) == (1, 1)
    assert idx.find(25, 105) == (0, 3)
    clip = idx.clip(25, 52)
    assert clip.offset.tolist() == [25, 50]
    assert clip.length.tolist() == [5, 2]
    assert clip.moffset.tolist() == [23, 100]
