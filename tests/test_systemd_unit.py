"""The systemd unit template: valid for systemd, and runs the supervised (foreground) mount."""

from __future__ import annotations

import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from obdfuse.cli import main as cli

UNIT = Path(__file__).resolve().parents[1] / "scripts" / "obdfuse@.service"


def _settings() -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, value = line.split("=", 1)
            found.setdefault(key.strip(), []).append(value.strip())
    return found


def test_unit_is_a_notify_service_that_restarts_on_failure():
    settings = _settings()
    assert settings["Type"] == ["notify"]
    assert settings["Restart"] == ["on-failure"]
    argv = shlex.split(settings["ExecStart"][0])
    assert argv[:4] == ["/usr/bin/env", "obdfuse", "mount", "--foreground"]
    assert argv[-2:] == ["${IMAGE}", "%f"]
    # Every option the unit passes exists on the command.
    known = {opt for param in cli.commands["mount"].params for opt in param.opts}
    assert {a for a in argv[2:] if a.startswith("--")} <= known


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="needs systemd-analyze")
def test_systemd_accepts_the_unit(tmp_path):
    instance = tmp_path / "obdfuse@mnt-app.service"
    shutil.copy(UNIT, instance)
    proc = subprocess.run(["systemd-analyze", "verify", str(instance)],
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 0 and not proc.stderr.strip(), proc.stderr
