"""`RegistryBlob`: a Blob whose bytes are one registry blob, read with range GETs.

Each pread is one ranged GET (the cache above coalesces). The outage policy
decides how long a read may keep retrying: `fail` gives up with RemoteError
after a deadline, `wait` retries until the registry answers again (the caller
may still cancel).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import trio

from obdfuse.asyncio_bridge import run_in_asyncio
from obdfuse.blob import clamp
from obdfuse.errors import ObdfuseError
from obdfuse.registry.client import RegistryClient


@dataclass(frozen=True)
class OutagePolicy:
    """What a read does while the registry is unreachable."""

    mode: str = "fail"  # "fail" | "wait"
    deadline: float = 30.0  # seconds, for "fail"

    def __post_init__(self) -> None:
        if self.mode not in ("fail", "wait"):
            raise ObdfuseError(f"--on-registry-error must be wait or fail, not {self.mode!r}")
        if self.deadline <= 0:
            raise ObdfuseError("the registry deadline must be positive")

    @property
    def client_deadline(self) -> float | None:
        return self.deadline if self.mode == "fail" else None


@dataclass
class FetchStats:
    """What went over the wire for one blob."""

    requests: int = 0
    bytes_fetched: int = 0
    errors: int = 0

    def as_dict(self) -> dict[str, int]:
        return {"requests": self.requests, "bytes_fetched": self.bytes_fetched,
                "errors": self.errors}


@dataclass
class RegistryBlob:
    """One blob of a repository, fetched by range on demand."""

    client: RegistryClient
    repository: str
    digest: str
    blob_size: int
    policy: OutagePolicy = field(default_factory=OutagePolicy)
    name: str = ""
    stats: FetchStats = field(default_factory=FetchStats)

    def __post_init__(self) -> None:
        if not self.name:
            self.name = f"{self.repository}@{self.digest}"

    @property
    def size(self) -> int:
        return self.blob_size

    async def pread(self, offset: int, length: int) -> bytes:
        n = clamp(self.blob_size, offset, length)
        if n == 0:
            return b""
        deadline = self.policy.client_deadline
        # a safety net over the client's own deadline: the trio side never waits longer
        guard = trio.fail_after(deadline + 5) if deadline is not None else contextlib.nullcontext()
        try:
            with guard:
                result = await run_in_asyncio(self.client.fetch_range, self.repository,
                                              self.digest, offset, n, deadline)
        except trio.TooSlowError:
            self.stats.errors += 1
            raise ObdfuseError(f"{self.name}: read at {offset} timed out") from None
        except ObdfuseError:
            self.stats.errors += 1
            raise
        self.stats.requests += 1
        self.stats.bytes_fetched += result.transferred
        return result.data

    async def aclose(self) -> None:
        return None
