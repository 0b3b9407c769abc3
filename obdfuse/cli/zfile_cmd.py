"""`obdfuse zfile ...`: compress, decompress, verify and describe ZFiles."""

from __future__ import annotations

import click


@click.group()
def zfile() -> None:
    """Block-compressed random-access files (overlaybd ZFile)."""
