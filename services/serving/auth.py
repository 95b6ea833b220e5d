"""API keys: who may read recommendations, who may administer.

Two key rings, each from a comma-separated setting and/or a file with one key a line
(`ENCORE_API_KEYS[_FILE]`, `ENCORE_ADMIN_API_KEYS[_FILE]`). A file is re-read when it changes,
so keys rotate without a restart: add the new key, move clients over, remove the old one. A key
is presented as `Authorization: Bearer <key>` or `X-API-Key: <key>` and compared with every
configured key in constant time (no early exit that would time which prefix matched).

With no key configured at all the API is open (the local demo); with read keys but no admin
keys the admin endpoints are off (403), never open.
"""

from __future__ import annotations

import hmac
import logging
import threading
from pathlib import Path

from fastapi import HTTPException, Request

from services.infra.settings import ConfigError, Settings

log = logging.getLogger(__name__)
UNAUTHORIZED = {"WWW-Authenticate": 'Bearer realm="encore"'}


class KeyRing:
    """Keys from an inline list and a file; the file is re-read whenever its mtime changes."""

    def __init__(self, inline: str, file: str = "") -> None:
        self._inline = [k.strip().encode() for k in inline.split(",") if k.strip()]
        self._file = Path(file) if file else None
        self._stamp: float | None = None
        self._from_file: list[bytes] = []
        self._lock = threading.Lock()
        if self._file is not None:
            try:
                self._reload()
            except OSError as exc:
                raise ConfigError(f"API key file {file}: {exc.strerror or exc}") from None

    def _reload(self) -> None:
        assert self._file is not None
        stamp = self._file.stat().st_mtime
        if stamp != self._stamp:
            lines = self._file.read_text().splitlines()
            self._from_file = [k.strip().encode() for k in lines if k.strip() and not k.startswith("#")]
            self._stamp = stamp

    def keys(self) -> list[bytes]:
        if self._file is not None:
            with self._lock:
                try:
                    self._reload()
                except OSError as exc:  # mid-rotation (file replaced): keep the last good keys
                    log.warning("API key file %s unreadable (%s); keeping the keys read before", self._file, exc)
        return self._inline + self._from_file

    def holds(self, presented: bytes) -> bool:
        found = False
        for key in self.keys():
            found |= hmac.compare_digest(presented, key)
        return found


def presented_key(request: Request) -> bytes | None:
    """The key of `Authorization: Bearer …` or, failing that, of `X-API-Key`."""
    auth = request.headers.get("authorization", "")
    scheme, _, value = auth.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip().encode()
    key = request.headers.get("x-api-key", "").strip()
    return key.encode() if key else None


class ApiAuth:
    """The two rings and the checks routes depend on."""

    def __init__(self, read: KeyRing, admin: KeyRing) -> None:
        self.read, self.admin = read, admin

    @classmethod
    def from_settings(cls, s: Settings) -> ApiAuth:
        return cls(KeyRing(s.api_keys, s.api_keys_file), KeyRing(s.admin_api_keys, s.admin_api_keys_file))

    @property
    def open(self) -> bool:
        """No key configured anywhere: every route answers without a key."""
        return not self.read.keys() and not self.admin.keys()

    # FastAPI runs a plain `def` dependency on its thread pool: a thread hop per request, for
    # checks that take microseconds (a stat of the key file at most). The routes depend on the
    # async wrappers below; the checks themselves stay plain functions for other callers.
    async def require_read(self, request: Request) -> None:
        self.check_read(request)

    async def require_admin(self, request: Request) -> None:
        self.check_admin(request)

    def check_read(self, request: Request) -> None:
        if self.open:
            return
        key = presented_key(request)
        if key is None:
            raise HTTPException(401, "an API key is required (Authorization: Bearer <key>)", UNAUTHORIZED)
        if not (self.read.holds(key) | self.admin.holds(key)):
            raise HTTPException(401, "unknown API key", UNAUTHORIZED)

    def check_admin(self, request: Request) -> None:
        if self.open:
            return
        key = presented_key(request)
        if key is None:
            raise HTTPException(401, "an admin API key is required (Authorization: Bearer <key>)", UNAUTHORIZED)
        if self.admin.holds(key):
            return
        if self.read.holds(key):
            raise HTTPException(403, "this key may read but not administer")
        raise HTTPException(401, "unknown API key", UNAUTHORIZED)


def warn_if_open(auth: ApiAuth, host: str) -> None:
    """Loudly, when an open API listens beyond this machine."""
    if auth.open and host not in ("127.0.0.1", "localhost", "::1"):
        log.warning(
            "THE API IS OPEN: no ENCORE_API_KEYS or ENCORE_ADMIN_API_KEYS set and it listens on %s; "
            "anyone who reaches it can read recommendations and switch model versions",
            host,
        )
        print(f"encore serve: WARNING: the API on {host} has no API keys; anyone who reaches it may use it", flush=True)
