"""The overlaybd tar wrapper (spec §4.3): field encodings, parsing rules, real tar readers."""

from __future__ import annotations

import hashlib
import io
import subprocess
import tarfile

import pytest
import trio

from obdfuse.blob import BytesBlob
from obdfuse.errors import FormatError
from obdfuse.tarwrap import (
    build_header,
    build_trailer,
    is_tar_header,
    parse_wrapper,
    pax_size_record,
    unwrap_tar,
    wrapped_size,
    write_wrapped,
)
from tests.support.zfiles import read_all

L1_SHA = "a0aa4788416f76a7b2a532b1fef1e5398f879a20d0dea0e42f02bc2bb9187f0d"


def _wrap(payload: bytes) -> bytes:
    out = io.BytesIO()
    write_wrapped(io.BytesIO(payload), out, len(payload))
    return out.getvalue()


def _checksum(block: bytes) -> int:
    return sum(block[:148]) + 8 * 32 + sum(block[156:512])


def test_pax_record_counts_its_own_length() -> None:
    assert pax_size_record(300338) == b"15 size=300338\n"
    assert pax_size_record(0) == b"9 size=0\n"
    for n in (1, 9, 10**5, 10**12, 123456789012345678901234567890):
        rec = pax_size_record(n)
        assert int(rec.split(b" ")[0]) == len(rec) and rec.endswith(b"size=%d\n" % n)
    # the length crossing a power of ten: 98 bytes of body + "100" would be 101
    edge = pax_size_record(10**90)
    assert edge.startswith(b"101 size=1000") and len(edge) == 101


def test_header_field_encodings() -> None:
    head = build_header(300338)
    assert len(head) == 1536
    pax, data, entry = head[:512], head[512:1024], head[1024:]
    # block 0: PAX header
    assert pax[:100] == b"overlaybd.pax".ljust(100, b"\0")
    assert pax[100:124] == bytes(24) and pax[136:148] == bytes(12)  # mode/uid/gid/mtime NUL
    assert pax[124:136] == b"%11o " % 15
    assert pax[156:157] == b"x"
    assert pax[257:265] == b"ustar\x0000"
    assert pax[148:156] == b"%6o \0" % _checksum(pax)
    assert pax[148:154].startswith(b" ")  # right-aligned with leading spaces
    assert pax[265:] == bytes(512 - 265)
    # block 1: the PAX record, NUL padded
    assert data == b"15 size=300338\n".ljust(512, b"\0")
    # block 2: the file header; real size only in PAX
    assert entry[:100] == b"overlaybd.commit".ljust(100, b"\0")
    assert entry[100:108] == b"100644 \0"
    assert entry[108:116] == entry[116:124] == b"     0 \0"
    assert entry[124:136] == entry[136:148] == b"          0 "
    assert entry[148:156] == b"%6o \0" % _checksum(entry)
    assert entry[156:157] == b"0"
    assert entry[157:257] == bytes(100)  # linkname
    assert entry[257:265] == b"ustar\x0000"
    assert entry[265:297] == b"root".ljust(32, b"\0")
    assert entry[297:329] == b"root".ljust(32, b"\0")
    assert entry[329:] == bytes(512 - 329)  # devmajor, devminor, prefix
    assert is_tar_header(pax) and is_tar_header(entry)


def test_trailer_and_total_size() -> None:
    assert build_trailer(512) == bytes(1024)
    assert build_trailer(300338) == bytes(-300338 % 512 + 1024)
    assert wrapped_size(300338) == 1536 + 300544 + 1024


def test_wrapped_sample_round_trip(samples) -> None:
    payload = (samples / "layers/l1.commit.lz4.zfile").read_bytes()
    wrapped = _wrap(payload)
    assert len(wrapped) == wrapped_size(len(payload)) == 1536 + 300544 + 1024
    assert parse_wrapper(wrapped[:2048]) == (1536, len(payload))
    assert wrapped[1536 : 1536 + len(payload)] == payload

    async def main() -> bytes:
        inner = await unwrap_tar(BytesBlob(wrapped, name="l1.tar"))
        assert inner.size == len(payload) and inner.name == "l1.tar"
        return await inner.pread(0, inner.size)

    assert trio.run(main) == payload

    assert hashlib.sha256(read_all(wrapped)).hexdigest() == L1_SHA


def test_real_tar_readers_accept_the_wrapper(tmp_path) -> None:
    payload = bytes(range(256)) * 77 + b"tail"
    wrapped = _wrap(payload)
    with tarfile.open(fileobj=io.BytesIO(wrapped)) as tf:
        (member,) = tf.getmembers()
        assert member.name == "overlaybd.commit" and member.size == len(payload)
        assert member.mode & 0o7777 == 0o644 and member.uname == "root"
        assert tf.extractfile(member).read() == payload
    path = tmp_path / "layer.tar"
    path.write_bytes(wrapped)
    out = subprocess.run(["tar", "-xOf", str(path)], capture_output=True, check=True).stdout
    assert out == payload


def test_plain_ustar_payload_at_512() -> None:
    payload = b"abc" * 1000
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        info = tarfile.TarInfo("overlaybd.commit")
        info.size = len(payload)
        tf.addfile(info, io.BytesIO(payload))
    assert parse_wrapper(buf.getvalue()[:2048]) == (512, len(payload))


def test_pax_without_size_record_falls_back_to_ustar_size() -> None:
    payload = b"x" * 700
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        info = tarfile.TarInfo("overlaybd.commit")
        info.size = len(payload)
        info.pax_headers = {"comment": "hi"}
        tf.addfile(info, io.BytesIO(payload))
    head = buf.getvalue()[:2048]
    assert head[156:157] == b"x"
    assert parse_wrapper(head) == (1536, len(payload))


def test_not_a_tar() -> None:
    assert parse_wrapper(b"") is None
    assert parse_wrapper(bytes(2048)) is None
    assert parse_wrapper(b"ZFile\0\1\0" + bytes(2040)) is None
    # GNU headers ("ustar  " magic, version " \0") are not recognised, as upstream (§4.2)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tf:
        info = tarfile.TarInfo("f")
        info.size = 3
        tf.addfile(info, io.BytesIO(b"abc"))
    assert parse_wrapper(buf.getvalue()[:2048]) is None


def test_bad_checksum_is_not_a_tar() -> None:
    head = bytearray(build_header(1000))
    head[300] = 1  # inside uname of the PAX header: checksum no longer matches
    assert parse_wrapper(bytes(head)) is None


def test_pax_data_longer_than_a_block_is_rejected() -> None:
    head = bytearray(build_header(1000))
    head[124:136] = b"%11o " % 600
    head[148:156] = b"%6o \0" % _checksum(bytes(head[:512]))
    with pytest.raises(FormatError, match="PAX data of 600 bytes spans more than one block"):
        parse_wrapper(bytes(head))


def test_malformed_pax_record() -> None:
    head = bytearray(build_header(1000))
    head[512:530] = b"99 size=1000\n".ljust(18, b"\0")
    with pytest.raises(FormatError, match="PAX record at 0 is malformed"):
        parse_wrapper(bytes(head))


def test_truncated_wrapped_blob() -> None:
    wrapped = _wrap(b"y" * 5000)
    with pytest.raises(FormatError, match=r"t.tar: tar payload at 1536 of 5000 bytes runs past"):
        trio.run(unwrap_tar, BytesBlob(wrapped[:3000], name="t.tar"))


def test_short_source_is_an_error() -> None:
    with pytest.raises(FormatError, match="payload ended 10 bytes short"):
        write_wrapped(io.BytesIO(b"z" * 90), io.BytesIO(), 100)


def test_unwrap_passes_other_blobs_through() -> None:
    blob = BytesBlob(b"just bytes")
    assert trio.run(unwrap_tar, blob) is blob


@pytest.mark.parametrize("size_field", [b"-1", b"+17", b"1_0", b"1 0", b"9"])
def test_size_fields_must_be_plain_octal(size_field: bytes) -> None:
    """int(x, 8) also takes signs, underscores and inner spaces; a tar field does not."""
    head = bytearray(build_header(1000))
    file_header = bytearray(head[1024:1536])
    file_header[124:136] = size_field.rjust(11, b" ") + b" "
    file_header[156:157] = b"0"
    file_header[148:156] = b"%6o \0" % _checksum(bytes(file_header))
    with pytest.raises(FormatError, match="is not an octal number"):
        parse_wrapper(bytes(file_header) + bytes(1536))
