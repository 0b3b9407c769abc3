"""SegmentMapping codec and the commit merge rule (spec §3.3, §3.6)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from obdfuse.layers.segment import (
    INVALID_ENTRY,
    MAX_LENGTH,
    check_fields,
    decode,
    encode,
    make_segments,
    merge_adjacent,
    split_pieces,
)


def test_invalid_entry_bytes_match_the_spec():
    assert bytes.fromhex("FFFFFFFFFFFF0300") + bytes(8) == INVALID_ENTRY


def test_decode_known_entry_and_drop_padding():
    # offset 5120, length 1024, moffset 1288, zeroed, tag 3
    lo = 5120 | (1024 << 50)
    hi = 1288 | (1 << 55) | (3 << 56)
    raw = lo.to_bytes(8, "little") + hi.to_bytes(8, "little") + INVALID_ENTRY * 3
    segs = decode(raw)
    assert len(segs) == 1
    assert (int(segs.offset[0]), int(segs.length[0]), int(segs.moffset[0])) == (5120, 1024, 1288)
    assert bool(segs.zeroed[0]) and int(segs.tag[0]) == 3
    assert len(decode(raw, keep_invalid=True)) == 4
    assert encode(segs) == raw[:16]


def test_decode_rejects_partial_entries():
    with pytest.raises(ValueError):
        decode(bytes(17))


entries = st.tuples(
    st.integers(0, (1 << 50) - 2),
    st.integers(0, MAX_LENGTH),
    st.integers(0, (1 << 55) - 1),
    st.booleans(),
    st.integers(0, 255),
)


@given(st.lists(entries, max_size=50))
def test_encode_decode_round_trip(items):
    segs = make_segments(*zip(*items, strict=True)) if items else make_segments([], [], [])
    back = decode(encode(segs))
    for name in ("offset", "length", "moffset", "zeroed", "tag"):
        assert np.array_equal(getattr(back, name), getattr(segs, name))


def test_check_fields_rejects_zero_length_and_overlong():
    check_fields(make_segments([0], [MAX_LENGTH], [8]), "x")
    with pytest.raises(ValueError, match="out of range"):
        check_fields(make_segments([0], [0], [8]), "x")
    with pytest.raises(ValueError, match="out of range"):
        check_fields(make_segments([0], [MAX_LENGTH + 1], [8]), "x")


def test_split_pieces_counts_from_each_mapping_start():
    segs = make_segments([0, 1000], [130, 64], [8, 500], [False, False])
    out = split_pieces(segs, 64, split_zeroed=False)
    assert out.offset.tolist() == [0, 64, 128, 1000]
    assert out.length.tolist() == [64, 64, 2, 64]
    assert out.moffset.tolist() == [8, 72, 136, 500]


def test_split_pieces_keeps_zeroed_whole():
    segs = make_segments([0], [1000], [8], [True])
    assert split_pieces(segs, 64, split_zeroed=False).length.tolist() == [1000]
    assert split_pieces(segs, 64, split_zeroed=True).length.sum() == 1000


def test_merge_is_strictly_below_16383():
    # 255 pieces of 64 = 16320; one more piece of 62 would make 16382 < 16383: fuses.
    n = 256
    lengths = [64] * 255 + [62]
    offs = np.concatenate(([0], np.cumsum(lengths)[:-1]))
    segs = make_segments(offs, lengths, offs + 8)
    out = merge_adjacent(segs)
    assert out.length.tolist() == [16382]
    # With 63 the sum would be exactly 16383: must split.
    lengths[-1] = 63
    segs = make_segments(offs, lengths, offs + 8)
    assert merge_adjacent(segs).length.tolist() == [16320, 63]
    assert n == len(lengths)


def test_merge_requires_contiguity_and_same_kind():
    segs = make_segments(
        [0, 10, 20, 30, 40],
        [10, 10, 10, 10, 10],
        [8, 18, 100, 110, 120],
        [False, False, False, True, True],
        [0, 0, 0, 0, 1],
    )
    # 0+10 fuse; 20 is physically elsewhere; zeroed 30 differs; tag 1 at 40 differs.
    out = merge_adjacent(segs)
    assert out.offset.tolist() == [0, 20, 30, 40]
    assert out.length.tolist() == [20, 10, 10, 10]


@given(st.lists(st.integers(1, 200), min_size=1, max_size=400))
def test_merge_matches_a_sequential_model(lengths):
    offs = np.concatenate(([0], np.cumsum(lengths)[:-1]))
    segs = make_segments(offs, lengths, offs + 8)
    model = []
    for off, ln in zip(offs.tolist(), lengths, strict=True):
        if model and model[-1][1] + ln < MAX_LENGTH:
            model[-1][1] += ln
        else:
            model.append([off, ln])
    out = merge_adjacent(segs, limit=MAX_LENGTH)
    assert [[int(a), int(b)] for a, b in zip(out.offset, out.length, strict=True)] == model
