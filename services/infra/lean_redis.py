"""A lean asyncio Redis client for the serving hot path: one pipelined connection per event loop.

Why: the personal route's one read (the user's vector and played tracks, GET + HKEYS) cost a
serve worker ~135 µs of CPU through redis-py's asyncio pipeline (command stack, pool, per-read
timeout context, response callbacks) and ~47 µs here (uvloop, hiredis; `bench/README.md`), a
tenth of the worker at 2,000 requests/s. Here requests are packed once, written to one
connection and answered in order by hiredis' parser: concurrent requests pipeline on the
connection without a pool or a lock, and one timer per connection, not one per request, guards
the timeout. Single-node Redis only (a cluster keeps redis-py's cluster client); connection
setup follows the same settings as every other client (URL, ACL user, password, TLS).
Failures raise redis-py's exceptions, so callers and the HTTP error mapping treat both alike.
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from typing import Any

import hiredis
from redis.asyncio.connection import RedisSSLContext, SSLConnection, UnixDomainSocketConnection, parse_url
from redis.exceptions import AuthenticationError, ConnectionError, InvalidResponse, ResponseError, TimeoutError

Command = tuple[str | bytes, ...]


def pack(commands: tuple[Command, ...]) -> bytes:
    """RESP arrays of bulk strings, all commands in one buffer."""
    out: list[bytes] = []
    for command in commands:
        out.append(b"*%d\r\n" % len(command))
        for arg in command:
            data = arg.encode() if isinstance(arg, str) else arg
            out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


class _Pending:
    __slots__ = ("future", "left", "replies", "deadline")

    def __init__(self, future: asyncio.Future[list[Any]], count: int, deadline: float) -> None:
        self.future, self.left, self.deadline = future, count, deadline
        self.replies: list[Any] = []


class _Resp(asyncio.Protocol):
    """One connection: requests answered in the order sent (Redis answers a connection in order)."""

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self.reader = hiredis.Reader(protocolError=InvalidResponse, replyError=ResponseError)
        self.pending: deque[_Pending] = deque()
        self.transport: asyncio.Transport | None = None
        self.lost: Exception | None = None
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def request(self, packed: bytes, count: int) -> asyncio.Future[list[Any]]:
        if self.lost is not None or self.transport is None:
            raise ConnectionError(f"Redis connection lost ({self.lost})")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[list[Any]] = loop.create_future()
        deadline = loop.time() + self.timeout_s
        self.pending.append(_Pending(future, count, deadline))
        if self._timer is None:
            self._timer = loop.call_at(deadline, self._check_timeout)
        self.transport.write(packed)
        return future

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        try:
            while self.pending:
                reply = self.reader.gets()
                if reply is False:
                    return
                head = self.pending[0]
                head.replies.append(reply)
                head.left -= 1
                if head.left == 0:
                    self.pending.popleft()
                    if not head.future.done():  # its caller may have been cancelled
                        head.future.set_result(head.replies)
        except InvalidResponse as exc:
            self._fail(exc)

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(exc or ConnectionError("closed by the server"))

    def _check_timeout(self) -> None:
        self._timer = None
        if not self.pending:
            return
        loop = asyncio.get_running_loop()
        if self.pending[0].deadline <= loop.time():
            self._fail(TimeoutError(f"no answer from Redis within {self.timeout_s} s"))
        else:
            self._timer = loop.call_at(self.pending[0].deadline, self._check_timeout)

    def _fail(self, exc: Exception) -> None:
        """Fail every waiting request and drop the connection (the next request reconnects)."""
        if self.lost is None:
            self.lost = exc
        if self.transport is not None:
            self.transport.abort()
        error = exc if isinstance(exc, (ConnectionError, TimeoutError)) else ConnectionError(str(exc))
        while self.pending:
            head = self.pending.popleft()
            if not head.future.done():
                head.future.set_exception(error)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


class LeanRedis:
    """`await execute(("GET", k), ("HKEYS", h))` → both replies, in one round trip."""

    def __init__(self, url: str, *, timeout_s: float, **security: Any) -> None:
        options = parse_url(url)
        self.timeout_s = timeout_s
        self.path: str | None = options.get("path")
        self.host: str = options.get("host", "localhost")
        self.port = int(options.get("port", 6379))
        self.db = int(options.get("db", 0))
        self.username = security.get("username") or options.get("username")
        self.password = security.get("password") or options.get("password")
        self.ssl: ssl.SSLContext | None = None
        if options.get("connection_class") is SSLConnection:
            self.ssl = RedisSSLContext(
                keyfile=security.get("ssl_keyfile"),
                certfile=security.get("ssl_certfile"),
                cert_reqs=security.get("ssl_cert_reqs", "required"),
                ca_certs=security.get("ssl_ca_certs"),
                check_hostname=True,  # as redis-py's SSLConnection does by default
            ).get()
        elif options.get("connection_class") not in (None, UnixDomainSocketConnection):
            raise ValueError(f"unsupported Redis URL {url!r}")
        self._conn: _Resp | None = None
        self._connecting: asyncio.Lock | None = None
        self._loop: asyncio.AbstractEventLoop | None = None  # the loop `_conn` belongs to

    async def execute(self, *commands: Command) -> list[Any]:
        """The replies of `commands`, sent together; an error reply is raised as ResponseError.
        A lost connection is retried once on a new one (the reads here are idempotent)."""
        packed = pack(commands)
        try:
            replies = await (await self._connection()).request(packed, len(commands))
        except ConnectionError:
            replies = await (await self._connection()).request(packed, len(commands))
        for reply in replies:
            if isinstance(reply, ResponseError):
                raise reply
        return replies

    async def _connection(self) -> _Resp:
        conn, loop = self._conn, asyncio.get_running_loop()
        if conn is not None and conn.lost is None and self._loop is loop:
            return conn
        if self._loop is not loop:  # first use, or a new event loop: nothing of the old one works here
            self._loop, self._conn, self._connecting = loop, None, None
        if self._connecting is None:
            self._connecting = asyncio.Lock()
        async with self._connecting:  # one connect at a time; the others wait and share it
            if self._conn is None or self._conn.lost is not None:
                self._conn = await self._connect()
            return self._conn

    async def _connect(self) -> _Resp:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.timeout_s):
                if self.path:
                    _, conn = await loop.create_unix_connection(lambda: _Resp(self.timeout_s), self.path)
                else:
                    _, conn = await loop.create_connection(
                        lambda: _Resp(self.timeout_s),
                        self.host,
                        self.port,
                        ssl=self.ssl,
                        server_hostname=self.host if self.ssl else None,
                    )
        except OSError as exc:  # the builtin TimeoutError (asyncio.timeout) is one
            raise ConnectionError(f"cannot connect to Redis at {self.host}:{self.port} ({exc})") from exc
        setup: list[Command] = []
        if self.password:
            auth: Command = ("AUTH", self.username, self.password) if self.username else ("AUTH", self.password)
            setup.append(auth)
        if self.db:
            setup.append(("SELECT", str(self.db)))
        if setup:
            replies = await conn.request(pack(tuple(setup)), len(setup))
            for reply in replies:
                if isinstance(reply, ResponseError):
                    conn._fail(AuthenticationError(str(reply)))
                    raise AuthenticationError(str(reply))
        return conn

    def close(self) -> None:
        if self._conn is not None and self._conn.transport is not None:
            self._conn.transport.close()
        self._conn = None
