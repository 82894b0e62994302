"""Who is calling: bearer tokens that belong to tenants, stored only as SHA-256 hashes.

The tokens file holds one token a line, ``TENANT ROLE sha256:HEX`` (ROLE ``user`` or ``admin``;
``#`` comments); ``hladr token TENANT --tokens FILE`` writes such a line and prints the token once.
The file is read again when it changes, so tokens are added, rotated and revoked without a restart.
``$HLADR_TOKENS`` may also give tokens in plain text (``TENANT:ROLE:TOKEN``, ``TENANT:TOKEN`` or
``TOKEN`` for tenant ``default``, comma-separated): they are hashed when read.

:class:`Gate` is the ASGI layer in front of the app: it authenticates from the headers and refuses
a body larger than the limit by its ``Content-Length``, before a byte of the body is read.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import secrets
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..atomic import atomic_write
from ..errors import HladrError

TOKENS_ENV = "HLADR_TOKENS"
MIN_TOKEN_LENGTH = 20
ROLES = ("user", "admin")
_TENANT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_HASHED = re.compile(r"sha256:([0-9a-f]{64})")
RELOAD_EVERY_S = 1.0
log = logging.getLogger("hladr.service")


@dataclass(frozen=True)
class Caller:
    """An authenticated caller: its tenant, whether it is an admin, and its token's fingerprint."""

    tenant: str
    admin: bool
    token_id: str  # the first 12 hex digits of the token's SHA-256, for the audit log

    def sees(self, tenant: str) -> bool:
        return self.admin or tenant == self.tenant


def token_hash(token: bytes) -> str:
    return hashlib.sha256(token).hexdigest()


def _caller(tenant: str, role: str, digest: str, where: str) -> Caller:
    if not _TENANT.fullmatch(tenant):
        raise HladrError(f"invalid tenant name {tenant!r} (letters, digits, '.', '_', '-')", where)
    if role not in ROLES:
        raise HladrError(f"role must be one of {', '.join(ROLES)}, not {role!r}", where)
    return Caller(tenant, role == "admin", digest[:12])


def parse_token_file(text: str, where: str) -> dict[str, Caller]:
    """``{token hash: Caller}`` from the lines of a tokens file (hashes only; plain tokens refused)."""
    out: dict[str, Caller] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        hashed = _HASHED.fullmatch(parts[-1]) if len(parts) == 3 else None
        if hashed is None:
            raise HladrError(
                f"line {number}: expected 'TENANT ROLE sha256:HEX' (tokens are stored hashed; "
                "add one with: hladr token TENANT --tokens FILE)",
                where,
            )
        out[hashed.group(1)] = _caller(parts[0], parts[1], hashed.group(1), f"{where}, line {number}")
    return out


def parse_token_env(text: str) -> dict[str, Caller]:
    """``{token hash: Caller}`` from ``$HLADR_TOKENS`` (plain tokens, hashed here)."""
    out: dict[str, Caller] = {}
    for entry in filter(None, (e.strip() for e in text.split(","))):
        parts = entry.split(":", 2)
        if len(parts) == 1:
            parts = ["default", "user", parts[0]]
        elif len(parts) == 2:
            parts = [parts[0], "user", parts[1]]
        tenant, role, token = parts
        if len(token) < MIN_TOKEN_LENGTH:
            raise HladrError(f"a token in ${TOKENS_ENV} is shorter than {MIN_TOKEN_LENGTH} characters")
        digest = token_hash(token.encode())
        out[digest] = _caller(tenant, role, digest, f"${TOKENS_ENV}")
    return out


class TokenRegistry:
    """The valid tokens (by hash), from a tokens file (re-read when it changes) and the environment."""

    def __init__(self, path: str | os.PathLike | None = None, env: str | None = None):
        self.path = Path(path) if path else None
        self._env = parse_token_env(os.environ.get(TOKENS_ENV, "") if env is None else env)
        self._lock = threading.Lock()
        self._stamp: tuple[int, int] | None = None
        self._checked = 0.0
        self._from_file: dict[str, Caller] = {}
        if self.path:
            self._from_file = self._read_file()
        if not self._env and not self._from_file:
            raise HladrError(
                f"no bearer tokens configured (use --tokens FILE or ${TOKENS_ENV}); refusing to start"
            )

    def _read_file(self) -> dict[str, Caller]:
        assert self.path is not None
        try:
            stat = self.path.stat()
            text = self.path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise HladrError(f"cannot read tokens: {exc}", self.path) from None
        tokens = parse_token_file(text, str(self.path))
        self._stamp = (stat.st_mtime_ns, stat.st_size)
        return tokens

    def _refresh(self) -> None:
        """Re-read the tokens file when it changed (at most once a second); keep the old set if broken."""
        now = time.monotonic()
        if self.path is None or now - self._checked < RELOAD_EVERY_S:
            return
        with self._lock:
            self._checked = now
            try:
                stat = self.path.stat()
                if (stat.st_mtime_ns, stat.st_size) != self._stamp:
                    self._from_file = self._read_file()
            except (OSError, HladrError) as exc:
                log.error("tokens not reloaded: %s", exc)

    def lookup(self, authorization: bytes | None) -> Caller | None:
        """The caller of an ``Authorization`` header's raw bytes, or None (any malformed value)."""
        if not authorization:
            return None
        scheme, _, token = authorization.strip().partition(b" ")
        token = token.strip()
        if scheme.lower() != b"bearer" or len(token) < MIN_TOKEN_LENGTH:
            return None
        self._refresh()
        digest = token_hash(token)
        return self._from_file.get(digest) or self._env.get(digest)


def add_token(path: str | os.PathLike, tenant: str, *, admin: bool = False) -> str:
    """Append a new random token for ``tenant`` to the tokens file (as its hash); return the token."""
    path = Path(path)
    token = secrets.token_urlsafe(32)
    digest = token_hash(token.encode())
    _caller(tenant, "admin" if admin else "user", digest, str(path))
    old = path.read_text(encoding="utf-8") if path.exists() else ""
    if old:
        parse_token_file(old, str(path))  # never append to a file the service cannot read
    line = f"{tenant} {'admin' if admin else 'user'} sha256:{digest}\n"
    atomic_write(path, old + ("" if not old or old.endswith("\n") else "\n") + line)
    os.chmod(path, 0o600)
    return token


# --- the ASGI gate -------------------------------------------------------------------------------
async def _refuse(send: Any, status: int, detail: str, headers: list[tuple[bytes, bytes]] = ()) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


class Gate:
    """ASGI middleware: 401 without a valid token and 413 for a too-large ``Content-Length``,
    answered from the headers alone (the body is never read); the caller goes to ``state``.

    Parameters
    ----------
    app
        The application behind the gate.
    tokens
        The token registry.
    max_body
        Largest request body accepted, in bytes.
    public
        Paths answered without a token.
    """

    def __init__(self, app: Any, tokens: TokenRegistry, max_body: int, public: set[str]):
        self.app, self.tokens, self.max_body, self.public = app, tokens, max_body, public

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers: dict[bytes, list[bytes]] = {}
        for name, value in scope["headers"]:
            headers.setdefault(name.lower(), []).append(value)
        if scope["path"] not in self.public:
            given = headers.get(b"authorization", [])
            caller = self.tokens.lookup(given[0]) if len(given) == 1 else None
            if caller is None:
                return await _refuse(
                    send, 401, "missing or invalid bearer token", [(b"www-authenticate", b"Bearer")]
                )
            scope.setdefault("state", {})["caller"] = caller
        lengths = headers.get(b"content-length", [])
        if lengths:
            if len(lengths) > 1 or not lengths[0].strip().isdigit():
                return await _refuse(send, 400, "invalid Content-Length")
            if int(lengths[0]) > self.max_body:
                return await _refuse(send, 413, f"request body larger than the {self.max_body:,}-byte limit")
        return await self.app(scope, receive, send)
