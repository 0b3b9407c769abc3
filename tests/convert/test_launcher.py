"""The pre-started CLI helper runs obdfuse commands like a fresh process would."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from obdfuse.convert.launcher import CliLauncher, LauncherUnavailable

REPO = Path(__file__).resolve().parents[2]


def test_commands_report_exit_codes_and_their_one_line_errors(tmp_path: Path) -> None:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    launcher = CliLauncher().start(env)
    try:
        assert launcher.run(["zfile", "--help"], env) == (0, "")
        code, err = launcher.run(["dump", str(tmp_path / "missing.json"), str(tmp_path / "o")], env)
        assert code != 0 and err.startswith("obdfuse: error:") and "Traceback" not in err
        code, err = launcher.run(["no-such-command"], env)
        assert code == 2 and "No such command" in err
        assert launcher.run(["zfile", "--help"], env)[0] == 0  # still serving
    finally:
        launcher.close()
    with pytest.raises(LauncherUnavailable):
        launcher.run(["zfile", "--help"], env)


def test_each_request_runs_with_its_own_environment(tmp_path: Path) -> None:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    env.pop("OBDFUSE_DEBUG", None)
    launcher = CliLauncher().start(env)
    missing = str(tmp_path / "missing.json")
    try:
        quiet = launcher.run(["dump", missing, missing], env)
        debug = launcher.run(["dump", missing, missing], dict(env, OBDFUSE_DEBUG="1"))
    finally:
        launcher.close()
    assert quiet[0] != 0 and "Traceback" not in quiet[1]
    assert debug[0] != 0 and "Traceback" in debug[1]  # OBDFUSE_DEBUG reached the command
