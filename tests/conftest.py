"""Shared fixtures: where the reference samples are."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SAMPLES = REPO.parent / "shared" / "samples"


@pytest.fixture(scope="session")
def samples() -> Path:
    """The read-only reference samples written by the C++ overlaybd tools."""
    if not SAMPLES.is_dir():
        pytest.fail(f"reference samples not found at {SAMPLES} (shared/ must sit beside the repo)")
    return SAMPLES


@pytest.fixture
def registry(tmp_path):
    """A fresh, empty docker-registry on 127.0.0.1 (stopped after the test)."""
    from tests.support.registry import RegistryServer

    with RegistryServer(tmp_path / "registry") as server:
        yield server


@pytest.fixture
def mounts(tmp_path):
    """Start `obdfuse mount` daemons, loop devices and filesystem mounts (`MountKit`).

    Everything started through it is unmounted, detached and killed at teardown,
    even when the test fails.
    """
    from tests.support.mounts import MountKit

    with MountKit(tmp_path) as kit:
        yield kit
