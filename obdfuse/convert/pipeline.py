"""The conversion pipelines: `convert` (OCI image → overlaybd) and `build` (dir → overlaybd).

convert: base layer (cached) → for each source layer, bottom first: a writable
layer over the layers so far, the layer tar applied to its ext4, committed with
uuid = chainID-derived and parent = the previous layer (spec §5.2) → publish
(layers, the source's config with new diff_ids, manifest with overlaybd
annotations). build: the same with one layer holding a directory tree.

All intermediate state lives in a `Workspace` that is torn down on success,
failure, Ctrl-C and SIGTERM alike.
"""

from __future__ import annotations

import datetime
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from obdfuse.convert.apply import ApplyStats, apply_layer
from obdfuse.convert.baselayer import default_cache_dir, ensure_base_layer
from obdfuse.convert.layerbuild import (
    BuiltLayer,
    LayerSettings,
    build_layer,
    chain_ids,
    chain_uuid,
    random_uuid,
)
from obdfuse.convert.oci import Platform
from obdfuse.convert.output import (
    A_BLOB_DIGEST,
    DOCKER_TYPES,
    OCI_TYPES,
    PublishedImage,
    new_config,
    overlaybd_config,
    publish,
)
from obdfuse.convert.progress import Progress
from obdfuse.convert.source import RegistrySettings, open_source
from obdfuse.convert.tardir import TreeTarStream
from obdfuse.convert.workspace import Workspace, signals_raise
from obdfuse.errors import ObdfuseError

log = logging.getLogger(__name__)


@dataclass
class ConvertOptions:
    """Everything a conversion or build needs besides source and destination."""

    settings: LayerSettings = field(default_factory=LayerSettings)
    cache_dir: Path = field(default_factory=default_cache_dir)
    work_dir: Path | None = None  # parent of the temporary work area
    keep_work: bool = False
    platform: Platform | None = None
    registry: RegistrySettings = field(default_factory=RegistrySettings)
    docker_media_types: bool = False
    progress: Progress = field(default_factory=Progress)

    @property
    def work_parent(self) -> Path:
        return self.work_dir or self.cache_dir / "work"


@dataclass
class ConvertResult:
    image: PublishedImage
    layers: list[BuiltLayer]
    stats: list[ApplyStats]


class _CountingReader:
    """Passes reads through and reports their sizes (progress of an apply)."""

    def __init__(self, inner: BinaryIO, tick: Callable[[int], None]) -> None:
        self._inner = inner
        self._tick = tick

    def read(self, n: int = -1) -> bytes:
        data = self._inner.read(n)
        self._tick(len(data))
        return data

    def close(self) -> None:
        self._inner.close()


MAX_SOURCE_LAYERS = 254  # overlaybd stacks at most 255 layers (spec §3.8), one is the base


def _check_source(source) -> None:
    """Refuse sources that cannot become overlaybd images (too many layers, already one)."""
    if len(source.layers) > MAX_SOURCE_LAYERS:
        raise ObdfuseError(
            f"{source.name} has {len(source.layers)} layers; an overlaybd image holds at most "
            f"{MAX_SOURCE_LAYERS} besides the base layer"
        )
    for i, desc in enumerate(source.layers):
        if A_BLOB_DIGEST in desc.annotations:
            raise ObdfuseError(
                f"{source.name} is already an overlaybd image (layer {i} carries overlaybd "
                "annotations); mount it with `obdfuse mount` instead"
            )


def convert_image(source_ref: str, destination: str, options: ConvertOptions) -> ConvertResult:
    """Convert an OCI image (layout or registry) into an overlaybd image at `destination`."""
    progress = options.progress
    settings = options.settings
    with signals_raise():
        base = ensure_base_layer(
            options.cache_dir, settings, progress=progress, work_parent=options.work_parent
        )
        with Workspace(options.work_parent, keep=options.keep_work) as ws:
            source = open_source(
                source_ref,
                platform=options.platform,
                download_dir=ws.path / "downloads",
                registry=options.registry,
                progress=progress,
            )
            _check_source(source)
            chains = chain_ids(source.diff_ids())
            lowers, built, stats = [base.path], [base], []
            total = len(source.layers)
            for i, desc in enumerate(source.layers):
                label = f"layer {i + 1}/{total}"
                blob = source.open_blob(desc)  # downloads a registry layer first

                def fill(root: Path, blob=blob, desc=desc, label=label) -> None:
                    with progress.bar(f"apply {label}", desc.size) as bar:
                        stats.append(
                            apply_layer(
                                _CountingReader(blob, bar.update),
                                root,
                                layer_name=f"{source.name} {label}",
                            )
                        )

                try:
                    layer = build_layer(
                        ws,
                        f"layer-{i}",
                        lowers,
                        ws.path / f"layer-{i}.commit",
                        layer_uuid=chain_uuid(chains[i]),
                        parent_uuid=built[-1].uuid,
                        settings=settings,
                        progress=progress,
                        fill=fill,
                    )
                finally:
                    blob.close()
                lowers.append(layer.path)
                built.append(layer)
            config = overlaybd_config(
                source.config,
                built,
                base_comment=f"obdfuse: empty {settings.fstype} base layer",
            )
            image = publish(
                destination,
                built,
                config,
                types=DOCKER_TYPES if options.docker_media_types else OCI_TYPES,
                fstype=settings.fstype,
                registry=options.registry,
                progress=progress,
            )
            return ConvertResult(image, built, stats)


def build_image(
    directory: Path,
    destination: str,
    options: ConvertOptions,
    *,
    container_config: dict[str, Any] | None = None,
) -> ConvertResult:
    """Build a one-layer overlaybd image (over the base layer) from a directory tree."""
    progress = options.progress
    settings = options.settings
    if not directory.is_dir():
        raise NotADirectoryError(20, "not a directory", str(directory))
    with signals_raise():
        base = ensure_base_layer(
            options.cache_dir, settings, progress=progress, work_parent=options.work_parent
        )
        with Workspace(options.work_parent, keep=options.keep_work) as ws:
            stats: list[ApplyStats] = []

            def fill(root: Path) -> None:
                # never archive our own work area (it holds the mounted image)
                exclude = (options.work_parent, options.cache_dir)
                with (
                    TreeTarStream(directory, exclude=exclude) as stream,
                    progress.bar(f"copy {directory}", None) as bar,
                ):
                    stats.append(
                        apply_layer(
                            _CountingReader(stream, bar.update), root, layer_name=str(directory)
                        )
                    )

            layer = build_layer(
                ws,
                "layer-0",
                [base.path],
                ws.path / "layer-0.commit",
                layer_uuid=random_uuid(),
                parent_uuid=base.uuid,
                settings=settings,
                progress=progress,
                fill=fill,
            )
            created = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
            platform = options.platform or Platform.host()
            config = new_config(
                [base, layer],
                architecture=platform.architecture,
                container_config=container_config or {},
                created=created,
                history=[
                    f"obdfuse: empty {settings.fstype} base layer",
                    f"obdfuse build {directory.name}",
                ],
            )
            image = publish(
                destination,
                [base, layer],
                config,
                types=DOCKER_TYPES if options.docker_media_types else OCI_TYPES,
                fstype=settings.fstype,
                registry=options.registry,
                progress=progress,
            )
            return ConvertResult(image, [base, layer], stats)
