"""`obdfuse iscsi serve`: export an image (or a raw disk file) as an iSCSI LUN without FUSE."""

from __future__ import annotations

import logging
import signal
import sys
from pathlib import Path

import click

from obdfuse.cli.params import SIZE
from obdfuse.cli.registry_opts import registry_options, remote_cache_options, remote_options_from


def parse_chap(text: str | None, option: str) -> tuple[str, str] | None:
    """`USER:SECRET` into a pair (the secret may contain ':')."""
    if text is None:
        return None
    user, sep, secret = text.partition(":")
    if not sep or not user or not secret:
        raise click.BadParameter("use USER:SECRET", param_hint=option)
    if not 12 <= len(secret) <= 255:
        click.echo(f"obdfuse: warning: {option} secret should be 12 to 255 characters "
                   "(RFC 7143 §12.1.3)", err=True)
    return user, secret


@click.group()
def iscsi() -> None:
    """The bundled userspace iSCSI target."""


@iscsi.command()
@click.argument("image")
@click.option("--listen", default="127.0.0.1:3260", show_default=True,
              help="HOST:PORT to listen on.")
@click.option("--iqn", default=None, help="Target name (default: iqn.2024-01.io.obdfuse:image).")
@click.option("--chap", "chap_text", metavar="USER:SECRET", default=None,
              help="Require one-way CHAP from initiators.")
@click.option("--mutual-chap", "mutual_text", metavar="USER:SECRET", default=None,
              help="Also authenticate the target to the initiator (needs --chap).")
@click.option("--upper", type=click.Path(path_type=Path), default=None,
              help="Writable upper layer directory (makes the LUN writable).")
@click.option("--size", type=SIZE, default=None, help="Virtual size of a new upper layer.")
@click.option("--cache-dir", type=click.Path(path_type=Path), default=None,
              help="Local cache for remote layers.")
@click.option("--raw", is_flag=True, help="IMAGE is a plain raw disk file.")
@click.option("--writable", is_flag=True, help="With --raw: allow writes to the file.")
@remote_cache_options
@registry_options
def serve(image: str, listen: str, iqn: str | None, chap_text: str | None,
          mutual_text: str | None, upper: Path | None, size: int | None,
          cache_dir: Path | None, raw: bool, writable: bool, **remote_kw) -> None:
    """Serve IMAGE as LUN 0 over iSCSI until interrupted.

    IMAGE is a config.v1.json, a layer file, an image reference in a registry
    (read lazily through the cache, like `obdfuse mount`), or with --raw a disk file.
    """
    import os

    import trio

    from obdfuse.iscsi.login import ChapCredentials
    from obdfuse.iscsi.server import DEFAULT_IQN, is_loopback, parse_listen

    try:
        host, _ = parse_listen(listen)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--listen") from exc
    chap_pair = parse_chap(chap_text, "--chap")
    mutual_pair = parse_chap(mutual_text, "--mutual-chap")
    if mutual_pair and not chap_pair:
        raise click.BadParameter("needs --chap as well", param_hint="--mutual-chap")
    chap = None
    if chap_pair:
        chap = ChapCredentials(chap_pair[0], chap_pair[1],
                               *(mutual_pair if mutual_pair else (None, None)))
    if not is_loopback(host) and chap is None:
        click.echo(f"obdfuse: warning: listening on {host} without CHAP: anyone who can "
                   "reach this port can read the image", err=True)
    if raw and (upper or size or cache_dir):
        raise click.BadParameter("--raw takes no --upper/--size/--cache-dir", param_hint="--raw")
    if writable and not raw:
        raise click.BadParameter("--writable is for --raw; use --upper for images",
                                 param_hint="--writable")
    local = raw or os.path.exists(image)
    remote = None if local else remote_options_from({**remote_kw, "cache_dir": cache_dir})
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="obdfuse: %(message)s")
    trio.run(_serve, image, listen, iqn or DEFAULT_IQN, chap, raw, writable, upper, size,
             cache_dir, remote)


async def _open_device(image: str, raw: bool, writable: bool, upper: Path | None,
                       size: int | None, cache_dir: Path | None, remote=None):
    if raw:
        from obdfuse.device import RawFileDevice

        return RawFileDevice(image, read_only=not writable)
    from obdfuse.image import open_image

    return await open_image(image, upper=upper, size=size, cache_dir=cache_dir, remote=remote)


async def _serve(image, listen, iqn, chap, raw, writable, upper, size, cache_dir,
                 remote=None) -> None:
    import trio

    from obdfuse.iscsi.server import serve_iscsi

    device = await _open_device(image, raw, writable, upper, size, cache_dir, remote)
    try:
        # Signals are caught before the port opens: a supervisor may stop us at once.
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async with trio.open_nursery() as nursery:
                port = await nursery.start(serve_iscsi, device, listen, iqn, chap)
                mode = "read-only" if device.read_only else "writable"
                host = listen.rsplit(":", 1)[0] or "127.0.0.1"
                click.echo(f"obdfuse: serving {image} ({mode}, {device.size} bytes) as "
                           f"iscsi://{host}:{port}/{iqn}/0", err=True)
                async for _ in signals:
                    nursery.cancel_scope.cancel()
                    break
    finally:
        with trio.CancelScope(shield=True):
            if not device.read_only:
                await device.flush()
            await device.aclose()
    sys.stderr.flush()
