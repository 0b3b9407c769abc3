"""Open an image as a `Stack`: a config.v1.json or a single layer file (+ an optional upper).

Dispatch is a list of (predicate, opener) pairs so new kinds of image specs
(registry references) are one more entry in `IMAGE_OPENERS`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack, suppress
from pathlib import Path
from typing import TYPE_CHECKING

from obdfuse.blob import FileBlob
from obdfuse.errors import FormatError
from obdfuse.layers.config import ImageConfig, load_config
from obdfuse.layers.header import SLOT_SIZE
from obdfuse.layers.sealed import SealedLayer, open_layer
from obdfuse.layers.stack import Stack, close_layers
from obdfuse.layers.writable import WritableLayer

if TYPE_CHECKING:
    from obdfuse.remote_image import RemoteOptions

log = logging.getLogger(__name__)

UPPER_DATA = "data"
UPPER_INDEX = "index"


async def open_image(
    spec: str | os.PathLike[str],
    *,
    upper: Path | None = None,
    size: int | None = None,
    cache_dir: Path | None = None,
    read_only: bool | None = None,
    remote: RemoteOptions | None = None,
) -> Stack:
    """Open `spec` (config.v1.json, layer file or image reference) as a Stack.

    An image reference (`host[:port]/repo[:tag|@digest]`) is resolved in its
    registry and its layers read lazily through the cache (`remote` options;
    `cache_dir` overrides theirs).

    `upper`: a directory holding a writable layer (`data` + `index`), created
    when missing with virtual size `size` (default: the lowers' size); an
    existing one must have that size. The stack is writable iff it has an
    upper, unless `read_only` says otherwise.
    """
    text = os.fspath(spec)
    if _is_reference(text):
        lowers, config_upper, config = await _open_reference(text, cache_dir, remote)
    else:
        for accepts, opener in IMAGE_OPENERS:
            if accepts(text):
                lowers, config_upper, config = await opener(text, cache_dir)
                break
        else:
            raise FormatError(f"{text}: not a file (expected a config.v1.json, a layer file "
                              "or an image reference)")
    rw: WritableLayer | None = None
    try:
        if upper is not None and config_upper is not None:
            raise FormatError(f"{text}: the config names an upper layer; do not pass another")
        ro = bool(read_only) if read_only is not None else False
        if upper is not None:
            rw = open_upper_dir(Path(upper), lowers, size, read_only=ro)
        elif config_upper is not None:
            data, index = config_upper
            rw = WritableLayer.open(data, index, read_only=ro)
        if rw is not None and lowers:
            vsize = _lowers_vsize(lowers)
            if rw.virtual_size == 0 and vsize and not rw.read_only:
                rw.set_virtual_size(vsize)
        stack = Stack(lowers, rw, read_only=read_only)
        if stack.size == 0:
            raise FormatError(
                f"{text}: the image has no virtual size (no layers and no size given)"
            )
    except BaseException as exc:
        if config is not None:
            config.write_result(f"failed:{exc}")
        with suppress(Exception):  # the error being reported matters more
            await close_layers(lowers, rw)  # the upper too: no fd leak if Stack() raised
        raise
    if config is not None:
        config.write_result("success")
    return stack


def open_upper_dir(
    path: Path, lowers: list[SealedLayer], size: int | None, *, read_only: bool
) -> WritableLayer:
    """Open or create the writable layer kept in directory `path`."""
    data, index = path / UPPER_DATA, path / UPPER_INDEX
    want = size if size is not None else _lowers_vsize(lowers)
    if _half_created(data, index):
        if read_only:
            raise FormatError(f"{path}: the writable layer was never fully created "
                              "(no data); open it writable once to recreate it")
        log.warning("%s: recreating a writable layer left half-created (no data)", path)
        data.unlink(missing_ok=True)
        index.unlink(missing_ok=True)
    elif index.exists() and not data.exists():
        raise FormatError(f"{path}: the writable layer's {UPPER_DATA} file is missing but its "
                          f"{UPPER_INDEX} holds writes; restore {data}, or remove {index} "
                          "to start an empty layer")
    if data.exists():
        layer = WritableLayer.open(data, index, read_only=read_only)
        if want and layer.virtual_size != want:
            layer.close()
            raise FormatError(
                f"{path}: the writable layer has virtual size {layer.virtual_size}, "
                f"but the image needs {want}"
            )
        return layer
    if read_only:
        raise FormatError(f"{path}: no writable layer here to open read-only")
    if not want:
        raise FormatError(f"{path}: cannot create a writable layer without a size")
    path.mkdir(parents=True, exist_ok=True)
    parent = lowers[-1].uuid if lowers else None
    return WritableLayer.create(data, index, want, parent_uuid=parent)


def _half_created(data: Path, index: Path) -> bool:
    """True for what a crash inside WritableLayer.create leaves: a data file that is
    missing or empty, beside an index that is missing, empty or a bare header."""
    try:
        data_size = data.stat().st_size
    except FileNotFoundError:
        data_size = None
    try:
        index_size = index.stat().st_size
    except FileNotFoundError:
        index_size = None
    if data_size is None and index_size is None:
        return False  # nothing there: simply create
    return not data_size and (index_size is None or index_size <= SLOT_SIZE)


def _lowers_vsize(lowers: list[SealedLayer]) -> int:
    for layer in reversed(lowers):
        if layer.virtual_size > 0:
            return layer.virtual_size
    return 0


Opened = tuple[list[SealedLayer], tuple[Path, Path | None] | None, ImageConfig | None]


def _is_config(text: str) -> bool:
    path = Path(text)
    if not path.is_file():
        return False
    if path.suffix == ".json":
        return True
    with open(path, "rb") as f:
        return f.read(64).lstrip()[:1] == b"{"


async def _open_config(text: str, cache_dir: Path | None) -> Opened:
    config = load_config(text)
    lowers: list[SealedLayer] = []
    async with AsyncExitStack() as cleanup:
        try:
            specs = config.lowers
            if config.raw.get("accelerationLayer") is True:
                specs = specs[:-1]  # the top lower holds a trace, not data (spec §7.3)
            for i, lower in enumerate(specs):
                file = lower.local_file()
                if file is None:
                    raise FormatError(
                        f"{config.path}: lowers[{i}] has no local file "
                        f"(file={lower.file}, dir={lower.dir}); remote layers need a registry"
                    )
                lowers.append(await open_layer_file(file))
                cleanup.push_async_callback(lowers[-1].aclose)
        except BaseException as exc:
            config.write_result(f"failed:{exc}")
            raise
        cleanup.pop_all()
    upper = (config.upper.data, config.upper.index) if config.upper else None
    return lowers, upper, config


def _is_reference(text: str) -> bool:
    from obdfuse.registry.reference import looks_like_reference

    return not Path(text).exists() and looks_like_reference(text)


async def _open_reference(
    text: str, cache_dir: Path | None, remote: RemoteOptions | None
) -> Opened:
    from dataclasses import replace

    from obdfuse.remote_image import RemoteOptions, open_remote_layers

    options = remote or RemoteOptions()
    if cache_dir is not None:
        options = replace(options, cache_dir=Path(cache_dir))
    lowers, _ = await open_remote_layers(text, options)
    return lowers, None, None


async def _open_layer_path(text: str, cache_dir: Path | None) -> Opened:
    return [await open_layer_file(Path(text))], None, None


async def open_layer_file(path: Path) -> SealedLayer:
    """Open one local layer file (tar/ZFile/LSMT detected)."""
    blob = FileBlob(path)
    try:
        return await open_layer(blob)
    except BaseException:
        blob.close()
        raise


IMAGE_OPENERS: list[
    tuple[Callable[[str], bool], Callable[[str, Path | None], Awaitable[Opened]]]
] = [
    (_is_config, _open_config),
    (lambda text: Path(text).is_file(), _open_layer_path),
]
