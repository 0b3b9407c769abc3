"""An asyncio registry client (OCI distribution API) on aiohttp.

Runs on the asyncio bridge loop (`obdfuse.asyncio_bridge`); trio code calls
its coroutines through `run_in_asyncio`. Owns: auth challenges and tokens,
manifest resolution with platform selection, ranged blob GETs (a `200` answer
to a range request is sliced, never mistaken for the range), redirects,
retries with exponential backoff and jitter under a deadline, and uploads
(monolithic or chunked) plus manifest PUT. Caching is not its business.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import random
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
from yarl import URL

from obdfuse.errors import CorruptDataError, FormatError, RemoteError
from obdfuse.registry import manifest as mf
from obdfuse.registry.auth import AuthState, Challenge, Credentials, parse_challenge
from obdfuse.registry.reference import ImageReference

log = logging.getLogger(__name__)
T = TypeVar("T")

RETRY_STATUS = {408, 425, 429, 500, 502, 503, 504}
MAX_TOKEN_BYTES = 1 << 20
MAX_CONFIG_BYTES = 8 << 20


class TransientError(RemoteError):
    """A failure worth retrying (connection refused/reset, timeout, 5xx, 429)."""


@dataclass(frozen=True)
class RangeResult:
    data: bytes
    transferred: int  # bytes received on the wire (more than len(data) after a 200)


@dataclass(frozen=True)
class ResolvedImage:
    reference: ImageReference  # pinned to the manifest digest
    manifest: mf.Manifest
    manifest_digest: str
    config: bytes


_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")


class RegistryClient:
    """HTTP access to one registry host. Create and use on the asyncio loop."""

    def __init__(
        self,
        base_url: str,
        credentials: Credentials | None = None,
        *,
        request_timeout: float = 30.0,
        connect_timeout: float = 5.0,
        max_connections: int = 16,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.auth = AuthState(credentials)
        self.request_timeout = request_timeout
        self.connect_timeout = connect_timeout
        self.max_connections = max_connections
        self._session: aiohttp.ClientSession | None = None
        self.ranges_ignored = False

    @classmethod
    def for_reference(cls, ref: ImageReference, credentials: Credentials | None = None,
                      **kw: Any) -> RegistryClient:
        return cls(ref.base_url, credentials, **kw)

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=self.connect_timeout),
                connector=aiohttp.TCPConnector(limit=self.max_connections),
                auto_decompress=False,
            )
        return self._session

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    # ---------------------------------------------------------------- plumbing

    async def _with_retries(
        self, what: str, attempt: Callable[[float], Awaitable[T]], deadline: float | None,
        attempt_timeout: float | None = None,
    ) -> T:
        """Run `attempt(timeout)` until it succeeds, retrying transient errors with
        exponential backoff and jitter; give up after `deadline` seconds (None: never).
        Each attempt runs under `attempt_timeout` (default: the request timeout)."""
        start = time.monotonic()
        delay = 0.05
        while True:
            timeout = attempt_timeout or self.request_timeout
            if deadline is not None:
                remaining = start + deadline - time.monotonic()
                timeout = max(0.05, min(timeout, remaining))
            try:
                async with asyncio.timeout(timeout):
                    return await attempt(timeout)
            except (TransientError, aiohttp.ClientConnectionError, aiohttp.ClientPayloadError,
                    TimeoutError) as exc:
                reason = _describe(exc)
            if deadline is not None and time.monotonic() + delay > start + deadline:
                raise RemoteError(f"{what}: {reason} (gave up after {deadline:g} s)")
            log.debug("%s: %s; retrying in %.2f s", what, reason, delay)
            await asyncio.sleep(delay * random.uniform(0.5, 1.5))
            delay = min(delay * 2, 2.0)

    async def _send(
        self, method: str, url: str | URL, scope: str, *, headers: dict[str, str] | None = None,
        data: bytes | None = None, allow_redirects: bool = True,
    ) -> aiohttp.ClientResponse:
        """One request with auth: answer a 401 challenge (basic or bearer) and resend."""
        tried_fresh_token = False
        for _ in range(3):
            hdrs = dict(headers or {})
            auth = self.auth.header_for(scope)
            if auth:
                hdrs["Authorization"] = auth
            resp = await self._http().request(method, url, headers=hdrs, data=data,
                                              allow_redirects=allow_redirects)
            if resp.status != 401:
                if resp.status in RETRY_STATUS:
                    resp.release()
                    raise TransientError(f"{method} {_safe(url)}: HTTP {resp.status}")
                return resp
            challenge = parse_challenge(resp.headers.get("WWW-Authenticate", ""))
            resp.release()
            if challenge is None:
                break
            if challenge.scheme == "basic":
                if self.auth.credentials is None:
                    raise RemoteError(f"{_safe(url)}: the registry requires credentials "
                                      "(use --creds USER:PASS or docker login)")
                if self.auth.scheme == "basic":
                    break  # the credentials were sent and refused
                self.auth.scheme = "basic"
            elif challenge.scheme == "bearer":
                if auth and auth.startswith("Bearer") and tried_fresh_token:
                    break
                self.auth.forget_token(scope)
                await self._fetch_token(challenge, scope)
                tried_fresh_token = True
                self.auth.scheme = "bearer"
            else:
                raise RemoteError(f"{_safe(url)}: unsupported auth scheme {challenge.scheme!r}")
        raise RemoteError(f"{method} {_safe(url)}: authentication failed (HTTP 401)")

    async def _fetch_token(self, challenge: Challenge, scope: str) -> None:
        realm = challenge.params.get("realm")
        if not realm:
            raise RemoteError("bearer challenge without a realm")
        query = {}
        if challenge.params.get("service"):
            query["service"] = challenge.params["service"]
        query["scope"] = scope
        hdrs = {}
        if self.auth.credentials is not None:
            hdrs["Authorization"] = self.auth.credentials.basic_header()
        async with self._http().get(URL(realm).update_query(query), headers=hdrs) as resp:
            if resp.status in RETRY_STATUS:
                raise TransientError(f"token service {realm}: HTTP {resp.status}")
            if resp.status != 200:
                raise RemoteError(f"token service {realm}: HTTP {resp.status} "
                                  f"(credentials refused for {scope})")
            body = await _read_limited(resp, MAX_TOKEN_BYTES, "token response")
        try:
            doc = json.loads(body)
            token = doc.get("token") or doc.get("access_token")
        except (ValueError, AttributeError):
            token = None
        if not isinstance(token, str) or not token:
            raise RemoteError(f"token service {realm}: no token in the response")
        expires = doc.get("expires_in")
        lifetime = expires if isinstance(expires, int | float) else None
        self.auth.remember_token(scope, token, lifetime)

    def _url(self, repo: str, kind: str, ref: str) -> str:
        return f"{self.base_url}/v2/{repo}/{kind}/{ref}"

    # ---------------------------------------------------------------- reading

    async def resolve(
        self, ref: ImageReference, platform: mf.Platform | None = None,
        deadline: float | None = 60.0,
    ) -> ResolvedImage:
        """Tag or digest → manifest (through an index if needed) → config blob."""
        platform = platform or mf.Platform()
        data, media_type, digest = await self.get_manifest(ref.repository, ref.reference, deadline)
        if ref.digest and digest != ref.digest:
            raise CorruptDataError(f"{ref}: manifest digest is {digest}")
        if media_type in mf.INDEX_TYPES:
            chosen = mf.select_platform(mf.parse_index(data, media_type, str(ref)), platform)
            data, media_type, digest = await self.get_manifest(ref.repository, chosen.digest,
                                                               deadline)
            if digest != chosen.digest:
                raise CorruptDataError(f"{ref}: manifest {chosen.digest} has digest {digest}")
        if media_type not in mf.MANIFEST_TYPES:
            raise FormatError(f"{ref}: unsupported manifest media type {media_type!r}")
        manifest = mf.parse_manifest(data, media_type, str(ref))
        if manifest.config.size > MAX_CONFIG_BYTES:
            raise FormatError(f"{ref}: image config of {manifest.config.size} bytes is too big")
        config = await self.get_blob(ref.repository, manifest.config.digest,
                                     manifest.config.size, deadline)
        return ResolvedImage(ref.with_reference(digest=digest, tag=ref.tag), manifest, digest,
                             config)

    async def get_manifest(self, repo: str, reference: str,
                           deadline: float | None = 60.0) -> tuple[bytes, str, str]:
        """(body, media type, sha256 digest of the body); verified when fetched by digest."""
        url = self._url(repo, "manifests", reference)

        async def attempt(_: float) -> tuple[bytes, str, str]:
            async with await self._send("GET", url, _scope(repo),
                                        headers={"Accept": mf.ACCEPT}) as resp:
                _check_status(resp, (200,), f"manifest {repo}:{reference}")
                body = await _read_limited(resp, mf.MAX_MANIFEST_BYTES, f"manifest {reference}")
                ctype = resp.headers.get("Content-Type")
            digest = mf.sha256_digest(body)
            if reference.startswith("sha256:") and digest != reference:
                raise CorruptDataError(f"manifest {repo}@{reference}: body has digest {digest}")
            return body, mf.media_type_of(body, ctype), digest

        return await self._with_retries(f"manifest {repo}:{reference}", attempt, deadline)

    async def get_blob(self, repo: str, digest: str, size: int,
                       deadline: float | None = 60.0) -> bytes:
        """A whole (small) blob, digest-verified."""
        mf.check_digest(digest)

        async def attempt(_: float) -> bytes:
            async with await self._send("GET", self._url(repo, "blobs", digest),
                                        _scope(repo)) as resp:
                _check_status(resp, (200,), f"blob {digest}")
                body = await _read_limited(resp, size, f"blob {digest}")
            mf.verify_digest(body, digest, f"blob {digest}")
            return body

        return await self._with_retries(f"blob {digest}", attempt, deadline)

    async def download_blob(self, repo: str, digest: str, size: int, path: Path,
                            deadline: float | None = 60.0) -> None:
        """Stream a whole blob into `path`, verifying its digest (written atomically)."""
        mf.check_digest(digest)
        tmp = path.with_name(f".{path.name}.part")

        async def attempt(_: float) -> None:
            h = hashlib.sha256()
            got = 0
            with open(tmp, "wb") as out:
                async with await self._send("GET", self._url(repo, "blobs", digest),
                                            _scope(repo)) as resp:
                    _check_status(resp, (200,), f"blob {digest}")
                    async for piece in resp.content.iter_chunked(1 << 20):
                        got += len(piece)
                        if got > size:
                            raise FormatError(f"blob {digest}: longer than {size} bytes")
                        h.update(piece)
                        await asyncio.to_thread(out.write, piece)
                if got != size:
                    raise TransientError(f"blob {digest}: body ended at {got} of {size}")
                if "sha256:" + h.hexdigest() != digest:
                    raise CorruptDataError(f"blob {digest}: downloaded content has digest "
                                           f"sha256:{h.hexdigest()}")
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, path)

        slow = self.request_timeout + size / (1 << 20)  # allow 1 MiB/s
        try:
            await self._with_retries(f"download {digest}", attempt,
                                     None if deadline is None else deadline + slow, slow)
        finally:
            tmp.unlink(missing_ok=True)

    async def blob_size(self, repo: str, digest: str, deadline: float | None = 60.0) -> int:
        async def attempt(_: float) -> int:
            async with await self._send("HEAD", self._url(repo, "blobs", digest),
                                        _scope(repo)) as resp:
                _check_status(resp, (200,), f"blob {digest}")
                if resp.content_length is None:
                    raise RemoteError(f"blob {digest}: no Content-Length")
                return resp.content_length

        return await self._with_retries(f"size of {digest}", attempt, deadline)

    async def fetch_range(self, repo: str, digest: str, offset: int, length: int,
                          deadline: float | None = 30.0) -> RangeResult:
        """Exactly bytes [offset, offset+length) of a blob (the caller clamps to its size)."""
        if offset < 0 or length <= 0:
            raise ValueError(f"bad range {offset}+{length}")
        end = offset + length - 1
        url = self._url(repo, "blobs", digest)
        what = f"blob {digest} range {offset}+{length}"

        async def attempt(_: float) -> RangeResult:
            async with await self._send("GET", url, _scope(repo),
                                        headers={"Range": f"bytes={offset}-{end}"}) as resp:
                if resp.status == 206:
                    m = _CONTENT_RANGE.fullmatch(resp.headers.get("Content-Range", "").strip())
                    if not m or int(m.group(1)) != offset or int(m.group(2)) != end:
                        raise RemoteError(f"{what}: answered with Content-Range "
                                          f"{resp.headers.get('Content-Range')!r}")
                    data = await _read_exactly(resp, length, what)
                    return RangeResult(data, len(data))
                if resp.status == 200:  # range ignored: the body is the whole blob; slice it
                    if not self.ranges_ignored:
                        self.ranges_ignored = True
                        log.warning("%s ignores Range requests: every read streams the blob "
                                    "from its start", self.base_url)
                    if resp.content_length is not None and resp.content_length < end + 1:
                        raise RemoteError(f"{what}: full answer of only {resp.content_length} "
                                          "bytes")
                    skipped = 0
                    while skipped < offset:
                        piece = await resp.content.read(min(1 << 20, offset - skipped))
                        if not piece:
                            raise TransientError(f"{what}: body ended at {skipped}")
                        skipped += len(piece)
                    data = await _read_exactly(resp, length, what)
                    return RangeResult(data, offset + length)
                _check_status(resp, (206,), what)
                raise AssertionError("unreachable")

        return await self._with_retries(what, attempt, deadline)

    # ---------------------------------------------------------------- writing

    async def blob_exists(self, repo: str, digest: str, deadline: float | None = 60.0) -> bool:
        async def attempt(_: float) -> bool:
            async with await self._send("HEAD", self._url(repo, "blobs", digest),
                                        _scope(repo, push=True)) as resp:
                if resp.status == 404:
                    return False
                _check_status(resp, (200,), f"blob {digest}")
                return True

        return await self._with_retries(f"HEAD {digest}", attempt, deadline)

    async def upload_blob(
        self, repo: str, path: Path, digest: str, size: int, *, chunk_size: int = 32 << 20,
        progress: Callable[[int], None] | None = None, deadline: float | None = 60.0,
    ) -> bool:
        """Upload a file as blob `digest` unless present; chunked (PATCH) when larger than
        `chunk_size`, else one monolithic PUT. Returns False if it was already there.
        An attempt may take as long as the blob needs at 1 MiB/s; `deadline` bounds the
        retrying of failures."""
        if await self.blob_exists(repo, digest, deadline):
            if progress:
                progress(size)
            return False
        scope = _scope(repo, push=True)

        async def attempt(_: float) -> bool:
            sent = 0
            async with await self._send("POST", f"{self.base_url}/v2/{repo}/blobs/uploads/",
                                        scope) as resp:
                _check_status(resp, (202,), f"start upload of {digest}")
                location = self._location(resp)
            with open(path, "rb") as fh:
                if size > chunk_size:
                    while sent < size:
                        piece = await asyncio.to_thread(fh.read, min(chunk_size, size - sent))
                        if not piece:
                            raise FormatError(f"{path}: shrank during upload at {sent}")
                        hdrs = {"Content-Type": "application/octet-stream",
                                "Content-Range": f"{sent}-{sent + len(piece) - 1}"}
                        async with await self._send("PATCH", location, scope, headers=hdrs,
                                                    data=piece) as resp:
                            _check_status(resp, (202,), f"upload of {digest} at {sent}")
                            location = self._location(resp)
                        sent += len(piece)
                        if progress:
                            progress(len(piece))
                    body = b""
                else:
                    body = await asyncio.to_thread(fh.read, size + 1)
                    if len(body) != size:
                        raise FormatError(f"{path}: changed size during upload")
            url = URL(location).update_query(digest=digest)
            async with await self._send("PUT", url, scope, data=body,
                                        headers={"Content-Type": "application/octet-stream"}
                                        ) as resp:
                _check_status(resp, (201,), f"finish upload of {digest}")
            if progress and body:
                progress(len(body))
            return True

        slow = self.request_timeout + size / (1 << 20)
        return await self._with_retries(f"upload {digest}", attempt,
                                        None if deadline is None else deadline + slow, slow)

    async def put_manifest(self, repo: str, tag: str, body: bytes, media_type: str,
                           deadline: float | None = 60.0) -> str:
        """PUT a manifest under `tag`; returns its digest."""
        digest = mf.sha256_digest(body)

        async def attempt(_: float) -> str:
            async with await self._send("PUT", self._url(repo, "manifests", tag),
                                        _scope(repo, push=True), data=body,
                                        headers={"Content-Type": media_type}) as resp:
                _check_status(resp, (201,), f"manifest {repo}:{tag}")
                echoed = resp.headers.get("Docker-Content-Digest")
            if echoed and echoed != digest:
                raise RemoteError(f"manifest {repo}:{tag}: registry says {echoed}, "
                                  f"we sent {digest}")
            return digest

        return await self._with_retries(f"manifest {repo}:{tag}", attempt, deadline)

    def _location(self, resp: aiohttp.ClientResponse) -> str:
        loc = resp.headers.get("Location")
        if not loc:
            raise RemoteError(f"{_safe(resp.url)}: upload answer without Location")
        return str(resp.url.join(URL(loc)))


def _scope(repo: str, push: bool = False) -> str:
    return f"repository:{repo}:{'pull,push' if push else 'pull'}"


def _safe(url: str | URL) -> str:
    """A URL for messages: no query (upload state) and no userinfo."""
    u = URL(str(url))
    return str(u.with_query(None).with_user(None))


def _describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timed out"
    return str(exc) or type(exc).__name__


def _check_status(resp: aiohttp.ClientResponse, ok: tuple[int, ...], what: str) -> None:
    if resp.status in ok:
        return
    if resp.status == 404:
        raise RemoteError(f"{what}: not found (HTTP 404 from {_safe(resp.url)})")
    if resp.status == 403:
        raise RemoteError(f"{what}: access denied (HTTP 403)")
    if resp.status == 416:
        raise RemoteError(f"{what}: range not satisfiable (HTTP 416)")
    raise RemoteError(f"{what}: unexpected HTTP {resp.status} from {_safe(resp.url)}")


async def _read_limited(resp: aiohttp.ClientResponse, limit: int, what: str) -> bytes:
    """The whole body, refusing (before buffering) anything longer than `limit`."""
    if resp.content_length is not None and resp.content_length > limit:
        raise FormatError(f"{what}: {resp.content_length} bytes exceeds the limit of {limit}")
    chunks, total = [], 0
    while True:
        piece = await resp.content.read(1 << 16)
        if not piece:
            break
        total += len(piece)
        if total > limit:
            raise FormatError(f"{what}: longer than the limit of {limit} bytes")
        chunks.append(piece)
    return b"".join(chunks)


async def _read_exactly(resp: aiohttp.ClientResponse, length: int, what: str) -> bytes:
    try:
        return await resp.content.readexactly(length)
    except asyncio.IncompleteReadError as exc:
        raise TransientError(f"{what}: body ended after {len(exc.partial)} bytes") from None


def file_digest(path: str | os.PathLike[str]) -> tuple[str, int]:
    """(sha256 digest, size) of a local file."""
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as fh:
        while piece := fh.read(1 << 20):
            h.update(piece)
            size += len(piece)
    return "sha256:" + h.hexdigest(), size
