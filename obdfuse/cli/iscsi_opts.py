"""`obdfuse mount --iscsi HOST:PORT`: serve the mounted image over iSCSI from the same daemon."""

from __future__ import annotations

import socket
from collections.abc import Awaitable, Callable
from typing import Any

import click

from obdfuse.device import BlockDevice

IscsiService = Callable[[BlockDevice], Awaitable[None]]


def iscsi_export_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """Add --iscsi, --iqn and --chap to a command (they arrive as iscsi_* keyword arguments)."""
    command = click.option(
        "--chap", "--iscsi-chap", "iscsi_chap", metavar="USER:SECRET", default=None,
        help="Require one-way CHAP from iSCSI initiators (with --iscsi).")(command)
    command = click.option(
        "--iqn", "iscsi_iqn", default=None,
        help="iSCSI target name [default: iqn.2024-01.io.obdfuse:image].")(command)
    command = click.option(
        "--iscsi", "iscsi_listen", metavar="HOST:PORT", default=None,
        help="Also export the image as LUN 0 of an iSCSI target listening on HOST:PORT.")(command)
    return command


def iscsi_service_from(
    iscsi_listen: str | None, iscsi_iqn: str | None, iscsi_chap: str | None
) -> IscsiService | None:
    """Validate the options now (one clear error before the daemon starts); the service to run."""
    if iscsi_listen is None:
        if iscsi_iqn or iscsi_chap:
            raise click.UsageError("--iqn and --chap need --iscsi HOST:PORT")
        return None
    from obdfuse.cli.iscsi_cmd import parse_chap
    from obdfuse.iscsi.login import ChapCredentials
    from obdfuse.iscsi.server import DEFAULT_IQN, is_loopback, parse_listen, serve_iscsi

    try:
        host, port = parse_listen(iscsi_listen)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--iscsi") from exc
    pair = parse_chap(iscsi_chap, "--chap")
    chap = ChapCredentials(pair[0], pair[1]) if pair else None
    if not is_loopback(host) and chap is None:
        click.echo(f"obdfuse: warning: iSCSI on {host} without CHAP: anyone who can reach "
                   "this port can read the image", err=True)
    _check_port_free(host, port)
    iqn = iscsi_iqn or DEFAULT_IQN

    async def serve(device: BlockDevice) -> None:
        await serve_iscsi(device, iscsi_listen, iqn, chap)

    return serve


def _check_port_free(host: str, port: int) -> None:
    """Fail before mounting if the iSCSI port cannot be bound (in use, bad address)."""
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((host, port))
    except OSError as exc:
        raise click.UsageError(f"--iscsi {host}:{port}: {exc.strerror or exc}") from exc
