"""Real iSCSI targets for tests: `obdfuse iscsi serve` and Debian's tgtd, plus a
parser for libiscsi's conformance-suite log.

Each target runs as its own process on a free 127.0.0.1 port and is stopped (and
its files removed) on exit, even when the test fails.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.support.registry import free_port

OBDFUSE_IQN = "iqn.2024-01.io.obdfuse:test"


def wait_for_port(port: int, proc: subprocess.Popen | None = None, timeout: float = 15.0) -> None:
    """Wait until something accepts on 127.0.0.1:port (or the process dies)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"target exited early with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port}")


class ObdfuseTarget:
    """`obdfuse iscsi serve` in a subprocess; `args` are the image arguments."""

    def __init__(self, *args: str, iqn: str = OBDFUSE_IQN, chap: str | None = None,
                 log: Path | None = None) -> None:
        self.args = list(args)
        self.iqn = iqn
        self.chap = chap
        self.port = free_port()
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"iscsi://127.0.0.1:{self.port}/{self.iqn}/0"

    def url_with(self, user: str, secret: str) -> str:
        return f"iscsi://{user}%{secret}@127.0.0.1:{self.port}/{self.iqn}/0"

    def start(self) -> ObdfuseTarget:
        cmd = [sys.executable, "-m", "obdfuse", "iscsi", "serve",
               "--listen", f"127.0.0.1:{self.port}", "--iqn", self.iqn, *self.args]
        if self.chap:
            cmd += ["--chap", self.chap]
        out = open(self.log, "wb") if self.log else subprocess.DEVNULL  # noqa: SIM115
        self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
        try:
            wait_for_port(self.port, self.proc)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> int | None:
        """SIGTERM (then SIGKILL); returns the exit status."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        rc = self.proc.returncode
        self.proc = None
        return rc

    def rss_kib(self) -> int:
        """Resident memory of the target process."""
        assert self.proc is not None
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise RuntimeError("no VmRSS")

    def __enter__(self) -> ObdfuseTarget:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class TgtTarget:
    """Debian's tgtd (userspace C target) serving `backing` as LUN 1, on its own
    portal and control port so it never meets another tgtd on the machine."""

    def __init__(self, backing: Path, iqn: str = "iqn.2024-01.io.obdfuse:tgt") -> None:
        self.backing = backing
        self.iqn = iqn
        self.port = free_port()
        self.control = 2000 + (self.port % 20000)
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"iscsi://127.0.0.1:{self.port}/{self.iqn}/1"

    def _adm(self, *args: str) -> None:
        subprocess.run(["tgtadm", "-C", str(self.control), "--lld", "iscsi", *args],
                       check=True, capture_output=True, timeout=30)

    def start(self) -> TgtTarget:
        self.proc = subprocess.Popen(
            ["tgtd", "-f", "-C", str(self.control), "--iscsi", f"portal=127.0.0.1:{self.port}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_for_port(self.port, self.proc)
            self._adm("--op", "new", "--mode", "target", "--tid", "1", "-T", self.iqn)
            self._adm("--op", "new", "--mode", "logicalunit", "--tid", "1", "--lun", "1",
                      "-b", str(self.backing))
            self._adm("--op", "bind", "--mode", "target", "--tid", "1", "-I", "ALL")
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Shut tgtd down the way it accepts (it ignores SIGTERM), then make sure."""
        if self.proc is not None:
            if self.proc.poll() is None:
                for args in (("--op", "delete", "--mode", "target", "--tid", "1", "--force"),
                             ("--op", "delete", "--mode", "system")):
                    with contextlib.suppress(subprocess.SubprocessError):
                        self._adm(*args)
                try:
                    self.proc.wait(5)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
            self.proc = None
        for suffix in ("", ".lock"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(f"/var/run/tgtd/socket.{self.control}{suffix}")

    def __enter__(self) -> TgtTarget:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


@dataclass
class ConformanceResult:
    """Outcome of one `iscsi-test-cu` run, with skips counted apart from passes."""

    total: int = 0
    passed: int = 0  # genuine passes (libiscsi's own count minus skips)
    failed: int = 0
    skipped: int = 0
    failures: list[str] = field(default_factory=list)
    skips: list[str] = field(default_factory=list)
    seconds: float = 0.0
    log: str = ""


# A test's outcome is CUnit's "passed"/"FAILED" right after "..." or at a line start,
# possibly followed on that line by log text of the next suite's setup.
_TEST = re.compile(
    r"Test: (\S+) \.\.\.(.*?)(?:(?<=\.\.\.)|(?<=\n))(passed|FAILED)(?=\n|    \[)", re.S)


def parse_test_cu(log: str) -> ConformanceResult:
    """Per-test outcomes from an iscsi-test-cu log (suite-qualified names)."""
    res = ConformanceResult(log=log)
    suite = ""
    for m in re.finditer(r"Suite: (\S+)|" + _TEST.pattern, log, re.S):
        if m.group(1):
            suite = m.group(1)
            continue
        name, body, outcome = f"{suite}.{m.group(2)}", m.group(3), m.group(4)
        res.total += 1
        if outcome == "FAILED":
            res.failed += 1
            res.failures.append(name)
        elif "[SKIPPED]" in body:
            res.skipped += 1
            res.skips.append(name)
        else:
            res.passed += 1
    summary = re.search(r"tests\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)", log)
    if summary:  # trust CUnit's totals; our per-test parse only splits passes/skips
        total, _, cu_passed, cu_failed = (int(x) for x in summary.groups())
        res.total, res.failed = total, cu_failed
        res.passed = cu_passed - res.skipped
    return res


def run_test_cu(url: str, tests: str = "ALL", timeout: float = 300,
                second_url: str | None = None) -> ConformanceResult:
    """Run libiscsi's conformance suite (`-d`: it may overwrite the LUN); a second URL
    to the same LU enables the multipath tests."""
    t0 = time.monotonic()
    urls = [url] + ([second_url] if second_url else [])
    proc = subprocess.run(["iscsi-test-cu", "-d", "-t", tests, *urls], capture_output=True,
                          text=True, errors="replace", timeout=timeout)
    res = parse_test_cu(proc.stdout + proc.stderr)
    res.seconds = time.monotonic() - t0
    return res
