"""Run `obdfuse mount`/`umount` many times without paying Python's start-up each time.

A conversion mounts and unmounts the image once per layer; a fresh interpreter
that imports obdfuse costs ≈0.3 s each time. `CliLauncher` starts one helper
process up front (single-threaded, obdfuse already imported, in its own session
so a terminal's Ctrl-C reaches only the converter) which runs each command in a
forked child — exactly the CLI's code path (including `obdfuse mount`'s own
daemonizing fork), only without the start-up. If the helper cannot be used, the
caller falls back to a plain subprocess.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import tempfile
import threading
from typing import TextIO

_SERVER = r"""
import json, os, sys
import click
import obdfuse.cli
import obdfuse.cli.mount_cmd
import obdfuse.image
from obdfuse.cli import describe_error, main

req_fd, resp_fd = os.dup(0), os.dup(1)
devnull = os.open(os.devnull, os.O_RDWR)
os.dup2(devnull, 0)
os.dup2(devnull, 1)
requests, responses = os.fdopen(req_fd, "r"), os.fdopen(resp_fd, "w")
for line in requests:
    req = json.loads(line)
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.close(req_fd)  # no daemon may keep our pipes open
            os.close(resp_fd)
            os.environ.clear()
            os.environ.update(req["env"])
            fd = os.open(req["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            os.dup2(fd, 2)
            os.close(fd)
            try:
                main.main(req["args"], prog_name="obdfuse", standalone_mode=False)
                code = 0
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
            except click.ClickException as exc:  # what standalone mode would print
                exc.show()
                code = exc.exit_code
            except BaseException as exc:
                if os.environ.get("OBDFUSE_DEBUG"):
                    import traceback
                    traceback.print_exc()
                print(f"obdfuse: error: {describe_error(exc)}", file=sys.stderr)
        finally:
            try:
                sys.stderr.flush()
            finally:
                os._exit(code)
    _, status = os.waitpid(pid, 0)
    responses.write(json.dumps({"rc": os.waitstatus_to_exitcode(status)}) + "\n")
    responses.flush()
"""


class LauncherUnavailable(Exception):
    """The helper process is not running (the caller uses a plain subprocess)."""


class CliLauncher:
    """A pre-started helper that runs `obdfuse` CLI commands by forking."""

    def __init__(self) -> None:
        self._proc: subprocess.Popen[str] | None = None
        self._requests: TextIO | None = None
        self._lock = threading.Lock()

    def start(self, env: dict[str, str] | None = None) -> CliLauncher:
        self._proc = subprocess.Popen(
            [sys.executable, "-c", _SERVER],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
            text=True,
            env=env,
        )
        self._requests = self._proc.stdin
        return self

    def run(self, args: list[str], env: dict[str, str], timeout: float = 600) -> tuple[int, str]:
        """(exit code, stderr text) of `obdfuse ARGS` with environment `env`."""
        with self._lock:
            proc = self._proc
            if proc is None or proc.poll() is not None or self._requests is None:
                raise LauncherUnavailable
            with tempfile.NamedTemporaryFile(prefix="obdfuse-cli-", suffix=".err") as err:
                request = {"args": args, "env": env, "stderr": err.name}
                try:
                    self._requests.write(json.dumps(request) + "\n")
                    self._requests.flush()
                except (BrokenPipeError, OSError):
                    raise LauncherUnavailable from None
                assert proc.stdout is not None
                line = proc.stdout.readline()
                if not line:
                    raise LauncherUnavailable
                text = open(err.name, errors="replace").read()  # noqa: SIM115
            return int(json.loads(line)["rc"]), text

    def close(self) -> None:
        with self._lock:
            if self._requests is not None:
                with contextlib.suppress(OSError):
                    self._requests.close()
                self._requests = None
            if self._proc is not None:
                try:
                    self._proc.wait(10)
                except subprocess.TimeoutExpired:
                    self._proc.kill()
                    self._proc.wait()
                if self._proc.stdout is not None:
                    self._proc.stdout.close()
                self._proc = None
