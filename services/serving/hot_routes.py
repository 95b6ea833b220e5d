"""A lean path, in front of FastAPI, for the two reads that make most of a replica's traffic.

Why: at 1,500 requests/s, FastAPI's per-request machinery (dependency solving, parameter
validation, its routing and exception layers) was a sixth of a serve worker's busy time, as
much as half the HNSW search (py-spy, bench/serving). `GET /recommendations/{user_id}` and
`GET /similar/{track_id}` asked with no parameter but `n`, and `POST /recommendations` with a
JSON body and no parameter, are answered here by the very handlers the FastAPI routes call,
with the same checks (API key, id length, 1 ≤ n ≤ max, FastAPI's body model) and the same
error bodies (`http_errors.error_response`). Anything else, including every request this layer
is unsure of (a filter, `explain`, a malformed `n`, a repeated key, a body FastAPI would
refuse), passes on to FastAPI, which validates, words the error and documents it as before.
"""

from __future__ import annotations

import json
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel
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


@dataclass(frozen=True)
class HotBody:
    """`POST /recommendations`: its handler, FastAPI route and body model (FastAPI's own)."""

    handler: Callable[[Any, TrackFilter], Awaitable[Response]]
    route: Any
    model: type[BaseModel]


class HotRoutes:
    """Pure ASGI layer: answers the plain hot reads itself, passes everything else on."""

    def __init__(
        self,
        app: Any,
        *,
        auth: ApiAuth,
        max_n: int,
        handlers: dict[str, tuple[Handler, Any]],
        anonymous: HotBody | None = None,
    ) -> None:
        """`handlers`: first path segment → (handler, the FastAPI route it stands for; set as
        the scope's route so that metrics label both paths alike)."""
        self.app, self.auth, self.max_n, self.handlers, self.anonymous = app, auth, max_n, handlers, anonymous
        self.served = 0  # requests answered here (tests check the path is taken)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope.get("root_path"):
            await self.app(scope, receive, send)
        elif scope["method"] == "GET":
            await self._get(scope, receive, send)
        elif scope["method"] == "POST" and scope["path"] == "/recommendations" and self.anonymous is not None:
            await self._post(scope, receive, send, self.anonymous)
        else:
            await self.app(scope, receive, send)

    async def _get(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        head, _, ident = scope["path"][1:].partition("/")
        entry = self.handlers.get(head)
        n = plain_n(scope["query_string"], self.max_n) if entry else None
        if entry is None or n is None or not ident or "/" in ident or len(ident) > MAX_ID_LENGTH:
            await self.app(scope, receive, send)
            return
        handler, route = entry
        await self._answer(scope, receive, send, route, lambda: handler(ident, n, TrackFilter()))

    async def _post(self, scope: dict[str, Any], receive: Any, send: Any, anon: HotBody) -> None:
        """A JSON body that FastAPI would accept the same way (json.loads, then its model) is
        answered here; any other, or a query string, goes on to FastAPI with the body replayed."""
        body, more = b"", True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client left (or the body limit answered already)
            body += message.get("body", b"")
            more = message.get("more_body", False)
        request = None
        if not scope["query_string"] and _is_json(scope):
            try:
                request = anon.model.model_validate(json.loads(body))
            except Exception:  # malformed, invalid, too deep: FastAPI answers it in its own words
                request = None
        if request is None:
            await self.app(scope, _replay(body, receive), send)
            return
        await self._answer(scope, receive, send, anon.route, lambda: anon.handler(request, TrackFilter()))

    async def _answer(
        self, scope: dict[str, Any], receive: Any, send: Any, route: Any, call: Callable[[], Awaitable[Response]]
    ) -> None:
        scope["route"] = route
        response: Response
        try:
            self.auth.check_read(Request(scope))
            response = await call()
        except Exception as exc:
            answer = error_response(exc)
            if answer is None:
                raise
            response = answer
        self.served += 1
        await response(scope, receive, send)


def _is_json(scope: dict[str, Any]) -> bool:
    for name, value in scope["headers"]:
        if name == b"content-type":
            return value.split(b";")[0].strip().lower() == b"application/json"
    return False


def _replay(body: bytes, receive: Any) -> Callable[[], Awaitable[dict[str, Any]]]:
    """A `receive` that hands FastAPI the body already read, then the client's own messages."""
    pending = [{"type": "http.request", "body": body, "more_body": False}]

    async def replayed() -> dict[str, Any]:
        return pending.pop() if pending else await receive()

    return replayed
