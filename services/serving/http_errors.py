"""Every error the HTTP API answers has one body, `{"detail": "<message>"}` (the `Error`
model), and every route documents each status it can return, so a client generated from the
schema handles what the server sends. Domain errors become status codes here and only here."""

from __future__ import annotations

from typing import Any

import redis
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from core.errors import NoModelError, UnknownTrackError
from services.serving.http_models import Error

RETRY_AFTER_S = 1
MAX_BODY_BYTES = 1 << 20  # a POST body larger than this is refused (413) before it is read

RETRY_HEADER = {"Retry-After": {"description": "seconds to wait", "schema": {"type": "integer"}}}
UNAUTHORIZED: dict[int | str, dict[str, Any]] = {
    401: {"model": Error, "description": "no API key, or an unknown one (when keys are configured)"},
}
READ: dict[int | str, dict[str, Any]] = {
    **UNAUTHORIZED,
    422: {"model": Error, "description": "a parameter or the body is invalid"},
    503: {"model": Error, "description": "no model yet, or Redis unreachable", "headers": RETRY_HEADER},
}
ADMIN: dict[int | str, dict[str, Any]] = {
    **READ,
    403: {"model": Error, "description": "the key may read but not administer"},
    404: {"model": Error, "description": "no such version kept in Redis"},
}
TRACK: dict[int | str, dict[str, Any]] = {**READ, 404: {"model": Error, "description": "unknown track"}}
BODY: dict[int | str, dict[str, Any]] = {
    **READ,
    400: {"model": Error, "description": "the body cannot be parsed (not UTF-8 JSON)"},
    413: {"model": Error, "description": "body over 1 MiB"},
}


def _message(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err.get("loc", ()) if p not in ("body", "query", "path"))
        parts.append(f"{where or 'request'}: {err.get('msg', 'invalid')}")
    return "; ".join(parts) or "invalid request"


def error_response(exc: Exception) -> JSONResponse | None:
    """The documented answer to a failure a handler may raise; None for a bug (a 500)."""
    if isinstance(exc, StarletteHTTPException):
        return JSONResponse({"detail": str(exc.detail)}, status_code=exc.status_code, headers=exc.headers)
    if isinstance(exc, NoModelError):
        return JSONResponse({"detail": str(exc)}, status_code=503, headers={"Retry-After": str(RETRY_AFTER_S)})
    if isinstance(exc, UnknownTrackError):
        return JSONResponse({"detail": str(exc)}, status_code=404)
    if isinstance(exc, redis.RedisError):
        body = {"detail": f"state store unavailable ({type(exc).__name__}); retry shortly"}
        return JSONResponse(body, status_code=503, headers={"Retry-After": str(RETRY_AFTER_S)})
    return None


def install(app: FastAPI) -> None:
    """The handlers that turn every failure into an `Error` body with its documented status
    (the same answers `hot_routes` gives)."""

    @app.exception_handler(RequestValidationError)
    async def invalid(_req: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse({"detail": _message(exc)}, status_code=422)

    async def known(_req: Request, exc: Exception) -> JSONResponse:
        return error_response(exc) or JSONResponse({"detail": "internal error"}, status_code=500)

    for cls in (StarletteHTTPException, NoModelError, UnknownTrackError, redis.RedisError):
        app.add_exception_handler(cls, known)


class BodyLimit:
    """Pure ASGI middleware: a request whose declared body exceeds MAX_BODY_BYTES gets 413 at
    once; one that streams past it without declaring a length is cut off with the same 413."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > MAX_BODY_BYTES):
            await _too_large(send)
            return
        seen, refused = [0], [False]

        async def limited() -> Any:
            if refused[0]:
                return {"type": "http.disconnect"}
            message = await receive()
            seen[0] += len(message.get("body", b""))
            if seen[0] > MAX_BODY_BYTES:  # answer now; the app sees the client gone
                refused[0] = True
                await _too_large(send)
                return {"type": "http.disconnect"}
            return message

        async def guarded(message: Any) -> None:
            if not refused[0]:
                await send(message)

        try:
            await self.app(scope, limited, guarded)
        except Exception:
            if not refused[0]:
                raise


async def _too_large(send: Any) -> None:
    body = b'{"detail":"request body over 1 MiB"}'
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": 413, "headers": headers})
    await send({"type": "http.response.body", "body": body})
