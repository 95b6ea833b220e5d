"""A lean path, in front of FastAPI, for the two reads that make most of a replica's traffic.

Why: at 1,500 requests/s, FastAPI's per-request machinery (dependency solving, parameter
validation, its routing and exception layers) was a sixth of a serve worker's busy time, as
much as half the HNSW search (py-spy, bench/serving). `GET /recommendations/{user_id}` and
`GET /similar/{track_id}` asked with no parameter but `n` are answered here by the very
handlers the FastAPI routes call, with the same checks (API key, id length, 1 ≤ n ≤ max) and
the same error bodies (`http_errors.error_response`). Anything else, including every request
this layer is unsure of (a filter, `explain`, a malformed `n`, a repeated key), passes through
untouched to FastAPI, which validates and documents it as before.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from core.filters import TrackFilter
from services.serving.auth import ApiAuth
from services.serving.http_errors import error_response
from services.serving.http_models import MAX_ID_LENGTH

Handler = Callable[[str, int, TrackFilter], Awaitable[Response]]
_PLAIN_N = re.compile(rb"n=([1-9][0-9]{0,5})")
DEFAULT_N = 10


def plain_n(query: bytes, max_n: int) -> int | None:
    """`n` of a query string that holds nothing else (absent: the default), if it is a plain
    in-range integer; None sends the request to FastAPI (which answers 422 where it must)."""
    if not query:
        return DEFAULT_N
    m = _PLAIN_N.fullmatch(query)
    if m is None:
        return None
    n = int(m.group(1))
    return n if n <= max_n else None


class HotRoutes:
    """Pure ASGI layer: answers the plain hot reads itself, passes everything else on."""

    def __init__(self, app: Any, *, auth: ApiAuth, max_n: int, handlers: dict[str, tuple[Handler, Any]]) -> None:
        """`handlers`: first path segment → (handler, the FastAPI route it stands for; set as
        the scope's route so that metrics label both paths alike)."""
        self.app, self.auth, self.max_n, self.handlers = app, auth, max_n, handlers
        self.served = 0  # requests answered here (tests check the path is taken)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["method"] != "GET" or scope.get("root_path"):
            await self.app(scope, receive, send)
            return
        head, _, ident = scope["path"][1:].partition("/")
        entry = self.handlers.get(head)
        n = plain_n(scope["query_string"], self.max_n) if entry else None
        if entry is None or n is None or not ident or "/" in ident or len(ident) > MAX_ID_LENGTH:
            await self.app(scope, receive, send)
            return
        handler, route = entry
        scope["route"] = route
        response: Response
        try:
            self.auth.check_read(Request(scope))
            response = await handler(ident, n, TrackFilter())
        except Exception as exc:
            answer = error_response(exc)
            if answer is None:
                raise
            response = answer
        self.served += 1
        await response(scope, receive, send)
