"""Property tests: ZFile round trips, and corruption never yields wrong bytes silently."""

from __future__ import annotations

import io

import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from obdfuse.blob import BytesBlob
from obdfuse.errors import ObdfuseError
from obdfuse.tarwrap import write_wrapped
from obdfuse.zfile import ZFileReader
from tests.support.zfiles import make_zfile, read_all

_chunks = st.one_of(
    st.binary(min_size=1, max_size=5000),
    st.integers(1, 9000).map(bytes),
    st.tuples(st.binary(min_size=1, max_size=20), st.integers(1, 500)).map(lambda t: t[0] * t[1]),
)
contents = st.lists(_chunks, max_size=12).map(b"".join)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    data=contents,
    algorithm=st.sampled_from(["lz4", "zstd"]),
    block_size=st.sampled_from([4096, 8192, 16384]),
    checksum=st.booleans(),
    seekable=st.booleans(),
    reads=st.lists(st.tuples(st.integers(0, 70000), st.integers(0, 40000)), max_size=8),
)
def test_round_trip(data, algorithm, block_size, checksum, seekable, reads) -> None:
    zf = make_zfile(
        data, algorithm=algorithm, block_size=block_size, checksum=checksum, seekable=seekable
    )
    assert read_all(zf) == data

    async def main() -> None:
        reader = await ZFileReader.open(BytesBlob(zf))
        for offset, length in reads:
            assert await reader.pread(offset, length) == data[offset : offset + length]

    trio.run(main)


ORIGINAL = (
    (b"sector %08d " * 2000 % tuple(range(2000)))[:30000] + bytes(9000) + bytes(range(256)) * 40
)
_plain = make_zfile(ORIGINAL, seekable=False)
_overwritten = make_zfile(ORIGINAL, algorithm="zstd", block_size=8192, seekable=True)
_wrapped_buf = io.BytesIO()
write_wrapped(io.BytesIO(_overwritten), _wrapped_buf, len(_overwritten))
FILES = {"plain": _plain, "overwritten": _overwritten, "tar": _wrapped_buf.getvalue()}


@settings(max_examples=300, deadline=None)
@given(
    which=st.sampled_from(sorted(FILES)),
    flips=st.lists(
        st.tuples(st.floats(0, 1, exclude_max=True), st.integers(1, 255)), min_size=1, max_size=4
    ),
    truncate=st.one_of(st.none(), st.integers(1, 3000)),
    chunk=st.sampled_from([1 << 20, 4096, 1000]),  # multi-block runs, one block, cached block
)
def test_corruption_never_returns_wrong_bytes(which, flips, truncate, chunk) -> None:
    buf = bytearray(FILES[which])
    for where, xor in flips:
        buf[int(where * len(buf))] ^= xor
    if truncate is not None:
        del buf[-truncate:]
    try:
        out = read_all(bytes(buf), chunk=chunk)
    except ObdfuseError:
        return
    assert out == ORIGINAL
