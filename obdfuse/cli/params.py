"""Shared click parameter types (sizes like 64G, 4K)."""

from __future__ import annotations

import re

import click

_UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50}


def parse_size(text: str) -> int:
    """Parse `4096`, `4K`, `4KiB`, `1G`, `64GB` (binary units) into bytes."""
    m = re.fullmatch(r"\s*(\d+)\s*([KMGTP]?)(?:I?B)?\s*", text.upper())
    if not m:
        raise ValueError(f"not a size: {text!r} (use e.g. 4096, 4K, 64G)")
    return int(m.group(1)) * _UNITS[m.group(2)]


class SizeParam(click.ParamType):
    """A click type for byte sizes with binary unit suffixes."""

    name = "SIZE"

    def convert(self, value, param, ctx):  # type: ignore[override]
        if isinstance(value, int):
            return value
        try:
            return parse_size(value)
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


SIZE = SizeParam()
