"""Progress bars for long conversion steps: on a terminal only, silent otherwise.

`Progress.bar(desc, total)` returns a context manager with `update(n)`. When
stderr is not a terminal (pipes, CI, tests) every bar is a no-op, so callers
never branch on it.
"""

from __future__ import annotations

import os
import sys
from types import TracebackType
from typing import TextIO


class _NullBar:
    def update(self, n: int = 1) -> None:
        return None

    def set_postfix_str(self, text: str) -> None:
        return None

    def __enter__(self) -> _NullBar:
        return self

    def __exit__(self, *exc: object) -> None:
        return None


class _TqdmBar:
    def __init__(self, desc: str, total: int | None, unit: str, stream: TextIO) -> None:
        from tqdm import tqdm

        scale = unit == "B"
        self._bar = tqdm(
            desc=desc,
            total=total,
            unit=unit,
            unit_scale=scale,
            unit_divisor=1024 if scale else 1000,
            file=stream,
            leave=True,
            ncols=_size(stream).columns,
            nrows=_size(stream).lines,
        )

    def update(self, n: int = 1) -> None:
        self._bar.update(n)

    def set_postfix_str(self, text: str) -> None:
        self._bar.set_postfix_str(text, refresh=False)

    def __enter__(self) -> _TqdmBar:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._bar.close()


def _size(stream: TextIO) -> os.terminal_size:
    """Size of the terminal behind `stream` (80x24 where it reports none, e.g. a new pty)."""
    try:
        size = os.get_terminal_size(stream.fileno())
    except (OSError, ValueError):
        return os.terminal_size((80, 24))
    return os.terminal_size((size.columns or 80, size.lines or 24))


class Progress:
    """Creates bars when enabled (default: when stderr is a terminal)."""

    def __init__(self, enabled: bool | None = None, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty() if enabled is None else enabled

    def bar(self, desc: str, total: int | None = None, unit: str = "B") -> _NullBar | _TqdmBar:
        if not self.enabled:
            return _NullBar()
        return _TqdmBar(desc, total, unit, self.stream)

    def note(self, text: str) -> None:
        """A one-line status message (terminal only)."""
        if self.enabled:
            print(text, file=self.stream, flush=True)
