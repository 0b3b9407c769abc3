"""config.v1.json parsing and open_image over it (spec §5.3)."""

from __future__ import annotations

import json

import pytest
import trio

from obdfuse.errors import FormatError, ObdfuseError
from obdfuse.image import open_image
from obdfuse.layers.config import load_config
from obdfuse.layers.writable import WritableLayer


def write_config(path, obj) -> None:
    path.write_text(json.dumps(obj))


def test_relative_paths_resolve_against_the_config_folder(tmp_path):
    cfg = tmp_path / "sub" / "config.v1.json"
    cfg.parent.mkdir()
    write_config(
        cfg,
        {
            "lowers": [
                {"file": "a.commit"},
                {"dir": "/abs/layer", "digest": "sha256:00", "size": 5},
            ],
            "upper": {"index": "up/index", "data": "up/data"},
            "resultFile": "result",
        },
    )
    config = load_config(cfg)
    assert config.lowers[0].file == cfg.parent / "a.commit"
    assert str(config.lowers[1].dir) == "/abs/layer" and config.lowers[1].size == 5
    assert config.upper.data == cfg.parent / "up" / "data"
    assert config.upper.index == cfg.parent / "up" / "index"
    assert config.result_file == cfg.parent / "result"


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("{nope", "not valid JSON"),
        ("[1, 2]", "must be a JSON object"),
        ('{"lowers": {}}', "'lowers' must be a list"),
        ('{"lowers": [3]}', "lowers[0] must be an object"),
        ('{"lowers": [{}]}', "names no file, dir or digest"),
        ('{"lowers": [{"file": 7}]}', "lowers[0].file must be a string"),
        ('{"lowers": [{"file": "x", "size": -1}]}', "size must be a non-negative"),
        ('{"lowers": [], "upper": {"index": "i"}}', "upper needs 'data'"),
    ],
)
def test_bad_configs_get_clear_errors(tmp_path, text, needle):
    cfg = tmp_path / "config.v1.json"
    cfg.write_text(text)
    with pytest.raises(FormatError) as err:
        load_config(cfg)
    assert needle in str(err.value) and str(cfg) in str(err.value)


def test_config_with_lower_and_upper(samples, tmp_path):
    (tmp_path / "l1.commit").symlink_to(samples / "layers" / "l1.commit")
    WritableLayer.create(tmp_path / "data", tmp_path / "index", 1 << 30).close()
    cfg = tmp_path / "config.v1.json"
    write_config(
        cfg,
        {
            "lowers": [{"file": "l1.commit"}],
            "upper": {"index": "index", "data": "data"},
            "resultFile": "result",
        },
    )

    async def go():
        stack = await open_image(cfg)
        assert not stack.read_only and stack.size == 1 << 30
        before = await stack.pread(1 << 20, 4096)
        await stack.pwrite(0, b"x" * 4096)
        await stack.flush()
        await stack.aclose()
        stack = await open_image(cfg, read_only=True)
        assert stack.read_only
        assert await stack.pread(0, 4096) == b"x" * 4096
        assert await stack.pread(1 << 20, 4096) == before
        await stack.aclose()

    trio.run(go)
    assert (tmp_path / "result").read_text() == "success"


def test_missing_lower_is_reported_in_result_file(tmp_path):
    cfg = tmp_path / "config.v1.json"
    write_config(cfg, {"lowers": [{"file": "gone.commit"}], "resultFile": "result"})
    with pytest.raises(FormatError, match=r"lowers\[0\] has no local file"):
        trio.run(open_image, cfg)
    assert (tmp_path / "result").read_text().startswith("failed:")


def test_writable_image_needs_an_upper(samples):
    async def go():
        await open_image(samples / "layers" / "l1.commit", read_only=False)

    with pytest.raises(ObdfuseError, match="upper"):
        trio.run(go)


def test_new_upper_takes_the_lowers_size_and_parent(samples, tmp_path):
    async def go():
        stack = await open_image(samples / "layers" / "l1.commit", upper=tmp_path / "up")
        assert stack.size == 1 << 30 and not stack.read_only
        assert stack.upper.parent_uuid == "11111111-2222-3333-4444-555555555501"
        await stack.aclose()
        with pytest.raises(FormatError, match="virtual size"):
            await open_image(samples / "layers" / "l1.commit", upper=tmp_path / "up", size=2 << 30)

    trio.run(go)


def test_an_unwritable_result_file_does_not_hide_the_real_error(tmp_path, caplog):
    cfg = tmp_path / "config.v1.json"
    write_config(cfg, {"lowers": [{"file": "gone.commit"}], "resultFile": "no/such/dir/result"})
    with pytest.raises(FormatError, match=r"lowers\[0\] has no local file"):
        trio.run(open_image, cfg)
    assert "cannot write resultFile" in caplog.text


def test_result_file_is_replaced_whole(tmp_path, samples):
    cfg = tmp_path / "config.v1.json"
    result = tmp_path / "result"
    result.write_text("failed:an older, much longer message than the next result")
    write_config(
        cfg, {"lowers": [{"file": str(samples / "layers" / "l1.commit")}], "resultFile": "result"}
    )
    trio.run(_open_and_close, cfg)
    assert result.read_text() == "success"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.v1.json", "result"]


async def _open_and_close(cfg):
    stack = await open_image(cfg)
    await stack.aclose()


def test_an_image_without_a_size_reports_failure_in_the_result_file(tmp_path):
    """The size check is part of opening: resultFile must not say success first."""
    cfg = tmp_path / "config.v1.json"
    write_config(cfg, {"lowers": [], "resultFile": "result"})
    with pytest.raises(FormatError, match="no virtual size"):
        trio.run(open_image, cfg)
    assert (tmp_path / "result").read_text().startswith("failed:")
    assert "no virtual size" in (tmp_path / "result").read_text()


@pytest.mark.parametrize("failing", ["Stack", "set_virtual_size"])
def test_a_failed_open_closes_the_upper(samples, tmp_path, monkeypatch, failing):
    """If building the stack fails after the upper is open, its files are closed."""
    import os

    import obdfuse.image

    def boom(*args, **kwargs):
        raise OSError("boom")

    up = tmp_path / "up"
    if failing == "set_virtual_size":  # an upper of size 0 gets the lowers' size on open
        cfg = tmp_path / "config.v1.json"
        layer = WritableLayer.create(tmp_path / "d", tmp_path / "i", 1 << 20)
        layer.close()
        write_config(cfg, {
            "lowers": [{"file": str(samples / "layers" / "l1.commit")}],
            "upper": {"data": "d", "index": "i"},
        })
        monkeypatch.setattr(WritableLayer, "virtual_size", property(lambda self: 0))
        monkeypatch.setattr(WritableLayer, "set_virtual_size", boom)
        spec, kwargs = cfg, {}
    else:
        monkeypatch.setattr(obdfuse.image, "Stack", boom)
        spec, kwargs = samples / "layers" / "l1.commit", {"upper": up}

    def open_fds():
        return {os.readlink(f"/proc/self/fd/{fd}") for fd in os.listdir("/proc/self/fd")
                if os.path.exists(f"/proc/self/fd/{fd}")}

    before = open_fds()
    with pytest.raises(OSError, match="boom"):
        trio.run(lambda: open_image(spec, **kwargs))
    leaked = {p for p in open_fds() - before if p.startswith(str(tmp_path))}
    assert not leaked


@pytest.mark.parametrize("left", ["index_header_only", "empty_files", "empty_data_only"])
def test_a_half_created_upper_is_recreated(samples, tmp_path, left):
    """A crash inside create leaves an upper without data: the next open recreates it."""
    up = tmp_path / "up"
    layer = WritableLayer.create(tmp_path / "d", tmp_path / "i", 1 << 30)
    layer.close()
    up.mkdir()
    if left == "index_header_only":
        (up / "index").write_bytes((tmp_path / "i").read_bytes())
    elif left == "empty_files":
        (up / "index").write_bytes(b"")
        (up / "data").write_bytes(b"")
    else:
        (up / "data").write_bytes(b"")

    async def go():
        stack = await open_image(samples / "layers" / "l1.commit", upper=up)
        await stack.pwrite(0, b"x" * 512)
        await stack.aclose()
        stack = await open_image(samples / "layers" / "l1.commit", upper=up)
        assert await stack.pread(0, 512) == b"x" * 512
        await stack.aclose()

    trio.run(go)


def test_an_upper_whose_data_is_missing_gets_a_clear_error(samples, tmp_path):
    up = tmp_path / "up"

    async def go():
        stack = await open_image(samples / "layers" / "l1.commit", upper=up)
        for i in range(20):
            await stack.pwrite(i * 4096, b"x" * 4096)
        await stack.aclose()

    trio.run(go)
    assert (up / "index").stat().st_size > 4096
    (up / "data").unlink()
    with pytest.raises(FormatError, match=r"data file is missing .* restore"):
        trio.run(lambda: open_image(samples / "layers" / "l1.commit", upper=up))
