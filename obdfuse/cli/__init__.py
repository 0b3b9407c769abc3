"""The `obdfuse` command: a click group whose subcommands live one per module.

Errors the user can cause (ObdfuseError, OSError) print one line on stderr and
exit 1; set OBDFUSE_DEBUG=1 for a traceback. No business logic here.
"""

from __future__ import annotations

import importlib
import os
import sys

import click

from obdfuse import __version__
from obdfuse.errors import ObdfuseError

# (module, attribute) of each subcommand; a new command is one new module + one line.
SUBCOMMANDS: list[tuple[str, str]] = [
    ("obdfuse.cli.zfile_cmd", "zfile"),
    ("obdfuse.cli.layer_cmd", "layer"),
    ("obdfuse.cli.dump_cmd", "dump"),
    ("obdfuse.cli.mount_cmd", "mount"),
    ("obdfuse.cli.mount_cmd", "umount"),
    ("obdfuse.cli.push_cmd", "push"),
    ("obdfuse.cli.stat_cmd", "stat"),
    ("obdfuse.cli.iscsi_cmd", "iscsi"),
    ("obdfuse.cli.convert_cmd", "convert"),
    ("obdfuse.cli.convert_cmd", "build"),
    ("obdfuse.cli.trace_cmd", "trace"),
]


class _Group(click.Group):
    """A click group that turns expected errors into one clean line."""

    def invoke(self, ctx: click.Context):  # type: ignore[override]
        try:
            return super().invoke(ctx)
        except (ObdfuseError, OSError) as exc:
            if os.environ.get("OBDFUSE_DEBUG"):
                raise
            click.echo(f"obdfuse: error: {describe_error(exc)}", err=True)
            sys.exit(1)


def describe_error(exc: BaseException) -> str:
    """One line that says what went wrong, without a traceback."""
    if isinstance(exc, OSError) and exc.strerror:
        where = f": {exc.filename}" if exc.filename else ""
        return f"{exc.strerror}{where}"
    return str(exc) or type(exc).__name__


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="obdfuse")
def main() -> None:
    """obdfuse: mount overlaybd container images lazily, block by block.

    Images are stacks of LSMT layers (optionally ZFile-compressed) read from
    local files or an OCI registry, exposed as one sparse file through FUSE or
    as an iSCSI LUN.
    """


for _module, _attr in SUBCOMMANDS:
    main.add_command(getattr(importlib.import_module(_module), _attr))
