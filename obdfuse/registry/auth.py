"""Registry credentials and auth challenges (anonymous, HTTP basic, bearer tokens).

Sans-IO: parse `WWW-Authenticate`, look up credentials (`--creds USER:PASS` or
`~/.docker/config.json`), cache tokens per scope. The client performs the
token request. Secrets never appear in repr() or log messages.
"""

from __future__ import annotations

import base64
import json
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from obdfuse.errors import ObdfuseError


@dataclass(frozen=True)
class Credentials:
    username: str
    password: str = field(repr=False)

    def __repr__(self) -> str:
        return f"Credentials(username={self.username!r}, password=<hidden>)"

    @classmethod
    def parse(cls, text: str) -> Credentials:
        """`USER:PASS` (the password may contain colons)."""
        user, sep, password = text.partition(":")
        if not sep or not user:
            raise ObdfuseError("credentials must look like USER:PASSWORD")
        return cls(user, password)

    def basic_header(self) -> str:
        raw = f"{self.username}:{self.password}".encode()
        return "Basic " + base64.b64encode(raw).decode()


@dataclass(frozen=True)
class Challenge:
    scheme: str  # "basic" or "bearer" (lower case)
    params: dict[str, str]


_PARAM = re.compile(r'\s*([A-Za-z0-9_.-]+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,]*))\s*,?')


def parse_challenge(header: str) -> Challenge | None:
    """Parse one `WWW-Authenticate` value (`Bearer realm="...",service="...",scope="..."`)."""
    header = header.strip()
    if not header:
        return None
    scheme, _, rest = header.partition(" ")
    params: dict[str, str] = {}
    pos = 0
    while pos < len(rest):
        m = _PARAM.match(rest, pos)
        if not m or m.end() == pos:
            break
        value = m.group(2) if m.group(2) is not None else m.group(3)
        params[m.group(1).lower()] = re.sub(r"\\(.)", r"\1", value)
        pos = m.end()
    return Challenge(scheme.lower(), params)


def docker_config_path() -> Path:
    return Path(os.environ.get("DOCKER_CONFIG", Path.home() / ".docker")) / "config.json"


def _host_of(key: str) -> str:
    key = re.sub(r"^[a-z]+://", "", key.strip())
    return key.split("/", 1)[0]


def credentials_from_docker_config(host: str, path: Path | None = None) -> Credentials | None:
    """Credentials for `host` from the `auths` of a docker config.json (`auth` = b64 user:pass)."""
    path = path or docker_config_path()
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise ObdfuseError(f"{path}: cannot read docker config ({exc})") from None
    auths = doc.get("auths") if isinstance(doc, dict) else None
    if not isinstance(auths, dict):
        return None
    wanted = {host}
    if host == "registry-1.docker.io":
        wanted |= {"docker.io", "index.docker.io"}
    for key, entry in auths.items():
        if _host_of(key) not in wanted or not isinstance(entry, dict):
            continue
        if isinstance(entry.get("auth"), str) and entry["auth"]:
            try:
                raw = base64.b64decode(entry["auth"]).decode()
            except ValueError:
                raise ObdfuseError(f"{path}: auth entry for {key} is not base64") from None
            return Credentials.parse(raw)
        if isinstance(entry.get("username"), str) and isinstance(entry.get("password"), str):
            return Credentials(entry["username"], entry["password"])
    return None


@dataclass
class Token:
    value: str
    expires_at: float


class AuthState:
    """What a client knows about one registry's auth: the scheme and tokens per scope."""

    MIN_TOKEN_LIFETIME = 60.0  # the distribution spec's default `expires_in`

    def __init__(self, credentials: Credentials | None) -> None:
        self.credentials = credentials
        self.scheme: str | None = None  # None until the registry asks
        self.bearer: Challenge | None = None
        self._tokens: dict[str, Token] = {}

    def header_for(self, scope: str) -> str | None:
        """The Authorization header to send now for `scope`, if any is known."""
        if self.scheme == "basic" and self.credentials:
            return self.credentials.basic_header()
        if self.scheme == "bearer":
            token = self._tokens.get(scope)
            if token and token.expires_at > time.monotonic() + 5:
                return f"Bearer {token.value}"
        return None

    def remember_token(self, scope: str, value: str, expires_in: float | None) -> None:
        lifetime = max(self.MIN_TOKEN_LIFETIME, float(expires_in or 0))
        self._tokens[scope] = Token(value, time.monotonic() + lifetime)

    def forget_token(self, scope: str) -> None:
        self._tokens.pop(scope, None)
