"""overlaybd image configs (`config.v1.json`, spec §5.3): parsing and path resolution.

Relative paths resolve against the folder holding the config file. No layer IO here.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from obdfuse.errors import FormatError
from obdfuse.fileio import atomic_output

log = logging.getLogger(__name__)

# Files tried inside a lower's `dir`, in order (after its `file`), §5.3.
DIR_CANDIDATES = ("overlaybd.commit", ".commit", "overlaybd.sealed")


@dataclass(frozen=True)
class LowerSpec:
    """One entry of `lowers[]` (index 0 = bottom)."""

    file: Path | None = None
    dir: Path | None = None
    digest: str | None = None
    size: int | None = None

    def local_file(self) -> Path | None:
        """The first existing local file among `file` and the `dir` candidates."""
        candidates = []
        if self.file is not None:
            candidates.append(self.file)
        if self.dir is not None:
            candidates += [self.dir / name for name in DIR_CANDIDATES]
        for path in candidates:
            if path.is_file():
                return path
        return None


@dataclass(frozen=True)
class UpperSpec:
    data: Path
    index: Path | None  # a sparse upper has no index file


@dataclass(frozen=True)
class ImageConfig:
    """A parsed config.v1.json."""

    path: Path
    lowers: list[LowerSpec]
    upper: UpperSpec | None = None
    result_file: Path | None = None
    repo_blob_url: str | None = None
    raw: dict[str, Any] = field(default_factory=dict)

    def write_result(self, text: str) -> None:
        """Record `success` or `failed:<reason>` in resultFile, as overlaybd does.

        The file is replaced atomically, so a watcher never reads half a result. A
        result that cannot be written is logged, never raised: it must not hide the
        error being reported, nor fail an image that opened.
        """
        if self.result_file is None:
            return
        try:
            with atomic_output(self.result_file) as f:
                f.write(text.encode("utf-8", "replace"))
        except OSError as exc:
            log.warning("%s: cannot write resultFile %s: %s", self.path, self.result_file, exc)


def load_config(path: str | Path) -> ImageConfig:
    """Read and validate a config.v1.json."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise FormatError(f"{path}: not valid JSON: {exc}") from None
    except UnicodeDecodeError:
        raise FormatError(f"{path}: not a text file") from None
    return parse_config(raw, path)


def parse_config(raw: Any, path: Path) -> ImageConfig:
    """Validate a decoded config; `path` locates relative paths and names errors."""
    if not isinstance(raw, dict):
        raise FormatError(f"{path}: the config must be a JSON object")
    base = path.parent

    def as_path(value: Any, what: str) -> Path | None:
        if value is None or value == "":
            return None
        if not isinstance(value, str):
            raise FormatError(f"{path}: {what} must be a string")
        p = Path(value)
        return p if p.is_absolute() else base / p

    lowers_raw = raw.get("lowers", [])
    if not isinstance(lowers_raw, list):
        raise FormatError(f"{path}: 'lowers' must be a list")
    lowers = []
    for i, item in enumerate(lowers_raw):
        if not isinstance(item, dict):
            raise FormatError(f"{path}: lowers[{i}] must be an object")
        size = item.get("size")
        if size is not None and (not isinstance(size, int) or size < 0):
            raise FormatError(f"{path}: lowers[{i}].size must be a non-negative integer")
        spec = LowerSpec(
            file=as_path(item.get("file"), f"lowers[{i}].file"),
            dir=as_path(item.get("dir"), f"lowers[{i}].dir"),
            digest=item.get("digest") or None,
            size=size,
        )
        if spec.file is None and spec.dir is None and spec.digest is None:
            raise FormatError(f"{path}: lowers[{i}] names no file, dir or digest")
        lowers.append(spec)
    upper = None
    upper_raw = raw.get("upper")
    if upper_raw:
        if not isinstance(upper_raw, dict):
            raise FormatError(f"{path}: 'upper' must be an object")
        index = as_path(upper_raw.get("index"), "upper.index")
        data = as_path(upper_raw.get("data"), "upper.data")
        if data is None:
            raise FormatError(f"{path}: upper needs 'data' (and 'index' unless sparse)")
        upper = UpperSpec(data=data, index=index)
    return ImageConfig(
        path=path,
        lowers=lowers,
        upper=upper,
        result_file=as_path(raw.get("resultFile"), "resultFile"),
        repo_blob_url=raw.get("repoBlobUrl") or None,
        raw=raw,
    )
