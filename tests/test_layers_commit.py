"""Commit (compaction) byte-compatible with overlaybd-commit (spec §3.4, §3.6)."""

from __future__ import annotations

import random
import threading

import numpy as np
import pytest
import trio

from obdfuse.blob import FileBlob
from obdfuse.errors import FormatError
from obdfuse.layers.commit import CommitOptions, commit_layer
from obdfuse.layers.header import LsmtHeader
from obdfuse.layers.sealed import open_layer
from obdfuse.layers.segment import INVALID_ENTRY, MAX_LENGTH, decode
from obdfuse.layers.stack import Stack
from obdfuse.layers.writable import WritableLayer
from tests.support.layers import apply_ops, random_ops

MIB = 1 << 20


SAMPLE_COMMITS = [("l1.commit", False), ("l1.commit.lz4.zfile", True)]


@pytest.mark.parametrize(("expected", "zfile"), SAMPLE_COMMITS)
def test_recommit_of_sealed_sample_is_byte_identical(samples, tmp_path, expected, zfile):
    """`overlaybd-commit [-z] --commit_sealed` of l1.commit reproduces the samples."""
    src = samples / "layers" / "l1.commit"

    async def go():
        layer = await open_layer(FileBlob(src))
        await commit_layer(layer, tmp_path / "out", CommitOptions(uuid=layer.uuid, zfile=zfile))
        await layer.aclose()

    trio.run(go)
    assert (tmp_path / "out").read_bytes() == (samples / "layers" / expected).read_bytes()


@pytest.mark.parametrize(("expected", "zfile"), SAMPLE_COMMITS)
def test_rw_layer_with_the_samples_mappings_commits_to_the_sample(
    samples, tmp_path, expected, zfile
):
    """An RW layer whose index equals l1.commit's commits to the samples byte for byte."""
    src = samples / "layers" / "l1.commit"

    async def go():
        sealed = await open_layer(FileBlob(src))
        rw = WritableLayer.create(
            tmp_path / "d", tmp_path / "i", sealed.virtual_size, parent_uuid=sealed.parent_uuid
        )
        segs = sealed.segments
        # Write in reverse so that the RW data file is laid out differently.
        for k in reversed(range(len(segs))):
            off, n, mo = int(segs.offset[k]), int(segs.length[k]), int(segs.moffset[k])
            rw.write(off * 512, await sealed.read_sectors(mo, n))
        rw.flush()
        await commit_layer(rw, tmp_path / "out", CommitOptions(uuid=sealed.uuid, zfile=zfile))
        rw.close()
        await sealed.aclose()

    trio.run(go)
    assert (tmp_path / "out").read_bytes() == (samples / "layers" / expected).read_bytes()


def check_commit_structure(raw: bytes) -> np.ndarray:
    """The rules every committed file follows (§3.4); returns the valid entries."""
    header = LsmtHeader.unpack(raw[:4096], "header")
    trailer = LsmtHeader.unpack(raw[-4096:], "trailer")
    assert header.flags == 0x07 and trailer.flags == 0x06
    assert header.index_offset == 0 and header.index_size == 0
    assert trailer.index_size % 256 == 0
    ioff = trailer.index_offset
    assert ioff % 512 == 0
    assert len(raw) == ioff + 16 * trailer.index_size + 4096
    index = raw[ioff : ioff + 16 * trailer.index_size]
    segs = decode(index)
    n = len(segs)
    assert index[16 * n :] == INVALID_ENTRY * (trailer.index_size - n)  # padding at the end
    assert (segs.end[:-1] <= segs.offset[1:]).all()
    assert (segs.length >= 1).all() and (segs.length <= MAX_LENGTH).all()
    data = ~segs.zeroed
    # Data from sector 8, contiguous, in ascending logical order, up to the index.
    lengths = segs.length[data]
    expect = 8 + np.cumsum(lengths) - lengths
    assert segs.moffset[data].tolist() == expect.tolist()
    assert 8 + int(lengths.sum()) == ioff // 512
    # Merge rule: no two neighbours could have been fused.
    fusible = (
        (segs.end[:-1] == segs.offset[1:])
        & (segs.mend[:-1] == segs.moffset[1:])
        & (segs.zeroed[:-1] == segs.zeroed[1:])
        & (segs.length[:-1] + segs.length[1:] < MAX_LENGTH)
    )
    assert not fusible.any()
    return segs


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_commit_follows_the_layout_rules(tmp_path, seed):
    rng = random.Random(seed)
    size = 48 * MIB
    rw = WritableLayer.create(tmp_path / "d", tmp_path / "i", size)
    model = bytearray(size)
    apply_ops(rw, model, random_ops(rng, size, 200), rng)
    big = rng.randbytes(10 * MIB)
    rw.write(20 * MIB, big)  # long runs: merged up to 16382 sectors
    model[20 * MIB : 30 * MIB] = big
    rw.discard(0, 12 * MIB)  # zeroed entries over 16383 sectors
    model[: 12 * MIB] = bytes(12 * MIB)
    out = tmp_path / "out"
    trio.run(commit_layer, rw, out, CommitOptions(user_tag=b"msg"))
    rw.close()
    segs = check_commit_structure(out.read_bytes())
    assert 16000 < int(segs.length[~segs.zeroed].max()) < MAX_LENGTH  # fused, strictly below
    assert int(segs.length[segs.zeroed].max()) == MAX_LENGTH
    assert LsmtHeader.unpack(out.read_bytes()[:4096], "h").user_tag == b"msg"

    async def read_back():
        stack = Stack([await open_layer(FileBlob(out))])
        try:
            return await stack.pread(0, size)
        finally:
            await stack.aclose()

    assert trio.run(read_back) == model


def test_commit_options_set_identity(tmp_path):
    parent = "c02fb491-b4d4-4904-8684-a014d032af78"
    rw = WritableLayer.create(tmp_path / "d", tmp_path / "i", MIB, parent_uuid=parent)
    rw.write(0, b"z" * 4096)
    trio.run(commit_layer, rw, tmp_path / "a", CommitOptions())
    a = LsmtHeader.unpack((tmp_path / "a").read_bytes()[-4096:], "a")
    assert a.uuid == "00000000-0000-0000-0000-000000000000"  # overlaybd-commit default
    assert a.parent_uuid == parent.upper()
    new_parent = "11111111-2222-3333-4444-555555555501"
    options = CommitOptions(uuid=parent, parent_uuid=new_parent)
    trio.run(commit_layer, rw, tmp_path / "b", options)
    b = LsmtHeader.unpack((tmp_path / "b").read_bytes()[-4096:], "b")
    assert (b.uuid, b.parent_uuid) == (parent.upper(), new_parent)
    rw.close()


def test_failed_commit_leaves_no_output(tmp_path):
    rw = WritableLayer.create(tmp_path / "d", tmp_path / "i", MIB)
    rw.write(0, b"z" * 4096)
    with pytest.raises(ValueError, match="256"):
        trio.run(commit_layer, rw, tmp_path / "out", CommitOptions(user_tag=b"x" * 300))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d", "i"]
    rw.close()


def test_empty_layer_commits_to_a_valid_empty_layer(tmp_path):
    rw = WritableLayer.create(tmp_path / "d", tmp_path / "i", MIB)
    trio.run(commit_layer, rw, tmp_path / "out", CommitOptions())
    raw = (tmp_path / "out").read_bytes()
    check_commit_structure(raw)
    assert len(raw) == 4096 + 4096  # no data, no index entries (0 padded to 0)
    layer = trio.run(open_layer, FileBlob(tmp_path / "out"))
    assert len(layer.segments) == 0
    rw.close()


def test_a_short_read_from_the_source_fails_the_commit_and_leaves_no_output(tmp_path):
    """A source returning fewer bytes than asked must not shift data under the index."""
    rw = WritableLayer.create(tmp_path / "d", tmp_path / "i", MIB)
    rw.write(0, b"a" * 8192)
    rw.write(65536, b"b" * 4096)

    class ShortSource:
        virtual_size = rw.virtual_size
        uuid = rw.uuid
        parent_uuid = rw.parent_uuid

        def commit_segments(self):
            return rw.commit_segments()

        async def read_tagged(self, tag, moffset, count):
            return (await rw.read_tagged(tag, moffset, count))[:-512]

    with pytest.raises(FormatError, match="returned 11776 of 12288 bytes"):
        trio.run(commit_layer, ShortSource(), tmp_path / "out", CommitOptions())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d", "i"]
    rw.close()


def test_a_failed_zfile_commit_stops_its_compression_threads(tmp_path):
    rw = WritableLayer.create(tmp_path / "d", tmp_path / "i", 8 * MIB)
    rw.write(4 * MIB, b"late" * 1024)  # data file order differs from logical order:
    rw.write(0, random.randbytes(MIB))  # two separate reads when committing

    class FailingSource:
        virtual_size = rw.virtual_size
        uuid = rw.uuid
        parent_uuid = rw.parent_uuid
        reads = 0

        def commit_segments(self):
            return rw.commit_segments()

        async def read_tagged(self, tag, moffset, count):
            self.reads += 1
            if self.reads == 2:
                raise OSError(5, "Input/output error")
            return await rw.read_tagged(tag, moffset, count)

    source = FailingSource()
    with pytest.raises(OSError, match="Input/output"):
        trio.run(commit_layer, source, tmp_path / "out", CommitOptions(zfile=True))
    assert source.reads == 2
    assert not [t for t in threading.enumerate() if t.name.startswith("zfile-compress")]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d", "i"]
    rw.close()


def test_an_unencodable_mapping_fails_the_commit_instead_of_corrupting_the_index(tmp_path):
    """A 14-bit length field cannot hold 16384 sectors: encoding it would wrap to 0."""
    from obdfuse.layers.segment import make_segments

    class HugeZeroedSource:
        virtual_size = 64 * MIB
        uuid = parent_uuid = ""

        def commit_segments(self):
            return make_segments([0], [MAX_LENGTH + 1], [0], zeroed=[True])

        async def read_tagged(self, tag, moffset, count):
            raise AssertionError("zeroed mappings have no data to read")

    with pytest.raises(ValueError, match="out of range"):
        trio.run(commit_layer, HugeZeroedSource(), tmp_path / "out", CommitOptions())
    assert not (tmp_path / "out").exists()
