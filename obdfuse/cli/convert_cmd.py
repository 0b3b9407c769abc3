"""`obdfuse convert SRC DST` and `obdfuse build DIR DST`: make overlaybd images."""

from __future__ import annotations

import logging
from pathlib import Path

import click

from obdfuse.cli.params import SIZE


def _common(fn):
    """Options shared by convert and build."""
    options = [
        click.option(
            "--algorithm",
            type=click.Choice(["lz4", "zstd"]),
            default="lz4",
            show_default=True,
            help="ZFile compression of the layers.",
        ),
        click.option(
            "--block-size",
            type=SIZE,
            default="4K",
            show_default=True,
            help="ZFile block size (a power of two, 4K..64K).",
        ),
        click.option(
            "--fstype",
            type=click.Choice(["ext4"]),
            default="ext4",
            show_default=True,
            help="Filesystem inside the image.",
        ),
        click.option(
            "--vsize",
            type=SIZE,
            default="64G",
            show_default=True,
            help="Virtual disk size of the base layer.",
        ),
        click.option(
            "--cache-dir",
            type=click.Path(path_type=Path),
            help="Where the base layer is cached [default: /var/cache/obdfuse, as for mount].",
        ),
        click.option(
            "--work-dir",
            type=click.Path(path_type=Path),
            help="Parent of the temporary work area [default: CACHE_DIR/work].",
        ),
        click.option(
            "--keep-work",
            is_flag=True,
            hidden=True,
            help="Keep the work area after success (debugging).",
        ),
        click.option(
            "--platform",
            help="os/arch[/variant] to pick from a multi-platform image [default: this host's].",
        ),
        click.option(
            "--creds",
            metavar="USER:PASS",
            envvar="OBDFUSE_CREDS",
            help="Registry credentials [default: ~/.docker/config.json].",
        ),
        click.option(
            "--plain-http/--https",
            default=None,
            help="Registry transport [default: HTTP for loopback hosts only].",
        ),
        click.option(
            "--docker-media-types",
            is_flag=True,
            help="Docker schema2 manifest/config/layer media types instead of OCI.",
        ),
        click.option(
            "--registry-timeout",
            type=click.FloatRange(min=0.1),
            default=60.0,
            show_default=True,
            help="Seconds of retrying before a registry request fails.",
        ),
        click.option("--verbose", "-v", is_flag=True, help="Log each step with its timing."),
        click.option(
            "--progress/--no-progress",
            default=None,
            help="Progress bars [default: when stderr is a terminal].",
        ),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def _options(kw: dict):
    from obdfuse.convert.baselayer import default_cache_dir
    from obdfuse.convert.layerbuild import LayerSettings
    from obdfuse.convert.oci import Platform
    from obdfuse.convert.pipeline import ConvertOptions
    from obdfuse.convert.progress import Progress
    from obdfuse.convert.source import RegistrySettings

    bs = kw["block_size"]
    if bs < 4096 or bs > 65536 or bs & (bs - 1):
        raise click.BadParameter("must be a power of two from 4K to 64K", param_hint="--block-size")
    if kw["vsize"] < (1 << 30) or kw["vsize"] % (1 << 20):
        raise click.BadParameter(
            "must be at least 1G and a whole number of MiB", param_hint="--vsize"
        )
    return ConvertOptions(
        settings=LayerSettings(
            algorithm=kw["algorithm"], block_size=bs, fstype=kw["fstype"], vsize=kw["vsize"]
        ),
        cache_dir=kw["cache_dir"] or default_cache_dir(),
        work_dir=kw["work_dir"],
        keep_work=kw["keep_work"],
        platform=Platform.parse(kw["platform"]) if kw["platform"] else None,
        registry=RegistrySettings(
            creds=kw["creds"], plain_http=kw["plain_http"], timeout=kw["registry_timeout"]
        ),
        docker_media_types=kw["docker_media_types"],
        progress=Progress(kw["progress"]),
    )


def _logging(kw: dict) -> None:
    level = logging.INFO if kw.pop("verbose") else logging.WARNING
    logging.basicConfig(level=level, format="obdfuse: %(message)s")


def _report(result) -> None:
    image = result.image
    click.echo(f"{image.destination}@{image.manifest_digest}")


@click.command()
@_common
@click.argument("source")
@click.argument("destination")
def convert(source: str, destination: str, **kw) -> None:
    """Convert the OCI image SOURCE into an overlaybd image DESTINATION.

    SOURCE and DESTINATION are registry references (host/repo:tag) or OCI
    layouts (oci:DIR[:TAG]). Layers may be tar, tar+gzip or tar+zstd, OCI or
    Docker media types. Prints DESTINATION@<manifest digest>.
    """
    from obdfuse.convert.pipeline import convert_image

    _logging(kw)
    _report(convert_image(source, destination, _options(kw)))


@click.command()
@_common
@click.option("--entrypoint", help="Entrypoint, as a JSON list or a plain command string.")
@click.option("--cmd", help="Default arguments (Cmd), as a JSON list or a plain string.")
@click.option("--env", "env", multiple=True, metavar="KEY=VALUE", help="Environment (repeat).")
@click.option("--workdir", help="Working directory.")
@click.option("--user", help="User (name, uid or uid:gid).")
@click.option("--label", "labels", multiple=True, metavar="KEY=VALUE", help="Label (repeat).")
@click.argument("directory", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("destination")
def build(
    directory: Path, destination: str, entrypoint, cmd, env, workdir, user, labels, **kw
) -> None:
    """Build a one-layer overlaybd image DESTINATION from the tree at DIRECTORY.

    Owners, modes, hard links, devices and xattrs are kept as they are on disk.
    Prints DESTINATION@<manifest digest>.
    """
    from obdfuse.convert.pipeline import build_image

    _logging(kw)
    config: dict = {}
    if entrypoint:
        config["Entrypoint"] = _command(entrypoint, "--entrypoint")
    if cmd:
        config["Cmd"] = _command(cmd, "--cmd")
    if env:
        config["Env"] = [_pair(e, "--env") and e for e in env]
    if workdir:
        config["WorkingDir"] = workdir
    if user:
        config["User"] = user
    if labels:
        config["Labels"] = dict(_pair(label, "--label") for label in labels)
    _report(build_image(directory, destination, _options(kw), container_config=config))


def _command(text: str, hint: str) -> list[str]:
    import json
    import shlex

    if text.lstrip().startswith("["):
        try:
            value = json.loads(text)
        except ValueError as exc:
            raise click.BadParameter(f"not a JSON list: {exc}", param_hint=hint) from None
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise click.BadParameter("must be a JSON list of strings", param_hint=hint)
        return value
    return shlex.split(text)


def _pair(text: str, hint: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise click.BadParameter(f"{text!r} is not KEY=VALUE", param_hint=hint)
    return key, value
