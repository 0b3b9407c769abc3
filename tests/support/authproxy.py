"""A bearer-token front for a real registry, for tests: token issuer + reverse proxy.

`/token` issues tokens (optionally only for basic-auth users); every `/v2/`
request needs `Authorization: Bearer <live token>` or gets a 401 challenge,
then is forwarded to the upstream registry. Switches for misbehaving servers:
`ignore_range` (answer range requests with the whole blob, 200) and
`redirect_blobs` (307 blob GETs to the upstream URL). Runs on 127.0.0.1 in a
thread with its own asyncio loop.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import threading

import aiohttp
from aiohttp import web

from tests.support.registry import free_port

HOP_HEADERS = {"connection", "keep-alive", "transfer-encoding", "host", "content-length",
               "authorization"}


class BearerProxy:
    def __init__(self, upstream: str, *, users: dict[str, str] | None = None,
                 expires_in: int = 300) -> None:
        self.upstream = upstream.rstrip("/")
        self.users = users or {}
        self.expires_in = expires_in
        self.port = free_port()
        self.tokens: set[str] = set()
        self.token_requests = 0
        self.unauthorized = 0
        self.requests: list[tuple[str, str, str | None]] = []  # method, path, Range
        self.ignore_range = False
        self.redirect_blobs = False
        self._counter = itertools.count(1)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def revoke_tokens(self) -> None:
        self.tokens.clear()

    async def _token(self, request: web.Request) -> web.Response:
        self.token_requests += 1
        if self.users:
            auth = request.headers.get("Authorization", "")
            try:
                user, _, password = base64.b64decode(auth.removeprefix("Basic ")).decode() \
                    .partition(":")
            except ValueError:
                user, password = "", ""
            if not auth.startswith("Basic ") or self.users.get(user) != password:
                return web.json_response({"errors": [{"code": "UNAUTHORIZED"}]}, status=401)
        token = f"token-{next(self._counter)}"
        self.tokens.add(token)
        return web.json_response({"token": token, "expires_in": self.expires_in})

    async def _proxy(self, request: web.Request) -> web.StreamResponse:
        self.requests.append((request.method, request.path, request.headers.get("Range")))
        auth = request.headers.get("Authorization", "")
        if not auth.startswith("Bearer ") or auth[7:] not in self.tokens:
            self.unauthorized += 1
            parts = request.path.split("/")
            repo = "/".join(parts[2:-2]) if len(parts) > 4 else ""
            challenge = (f'Bearer realm="http://{self.host}/token",service="obdfuse-test",'
                         f'scope="repository:{repo}:pull"')
            return web.json_response({"errors": [{"code": "UNAUTHORIZED"}]}, status=401,
                                     headers={"WWW-Authenticate": challenge})
        url = self.upstream + request.path_qs
        if self.redirect_blobs and request.method == "GET" and "/blobs/sha256:" in request.path:
            raise web.HTTPTemporaryRedirect(url)
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_HEADERS}
        if self.ignore_range:
            headers.pop("Range", None)
        body = await request.read()
        assert self._session is not None
        async with self._session.request(request.method, url, headers=headers, data=body or None,
                                         allow_redirects=False) as up:
            resp = web.StreamResponse(status=up.status)
            for k, v in up.headers.items():
                if k.lower() not in HOP_HEADERS:
                    resp.headers[k] = v
            if up.content_length is not None:
                resp.content_length = up.content_length
            await resp.prepare(request)
            if request.method != "HEAD":
                async for piece in up.content.iter_chunked(1 << 16):
                    await resp.write(piece)
            await resp.write_eof()
            return resp

    def start(self) -> BearerProxy:
        ready = threading.Event()

        async def setup() -> None:
            app = web.Application(client_max_size=1 << 30)
            app.router.add_get("/token", self._token)
            app.router.add_route("*", "/v2/{tail:.*}", self._proxy)
            self._session = aiohttp.ClientSession(auto_decompress=False)
            self._runner = web.AppRunner(app)
            await self._runner.setup()
            await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

        def serve() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            loop.run_until_complete(setup())
            ready.set()
            loop.run_forever()
            loop.close()

        self._thread = threading.Thread(target=serve, daemon=True, name="bearer-proxy")
        self._thread.start()
        ready.wait(10)
        return self

    def stop(self) -> None:
        if self._loop is None:
            return

        async def teardown() -> None:
            if self._runner:
                await self._runner.cleanup()
            if self._session:
                await self._session.close()

        asyncio.run_coroutine_threadsafe(teardown(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread:
            self._thread.join(10)
        self._loop = None

    def __enter__(self) -> BearerProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
