"""What every answer of the read routes is made of: the body builder and the request id."""

from __future__ import annotations

import itertools
import os
from typing import Any

import orjson
from fastapi import Response

_prefix, _counter = "", itertools.count()


def _new_prefix() -> None:
    """A fresh random prefix: at import and in every forked child (workers are forked)."""
    global _prefix, _counter
    _prefix, _counter = os.urandom(8).hex(), itertools.count()


_new_prefix()
os.register_at_fork(after_in_child=_new_prefix)


def request_id() -> str:
    """A unique id in uuid4's hex form without a system call per request: a random 64-bit
    prefix, drawn again in each process, and a counter (a `urandom` call each was 1 % of a serve
    worker; a `getpid` check each, to notice a fork, 0.6 %: system calls are dear on this VM)."""
    return f"{_prefix}{next(_counter):016x}"


def answer(
    body: dict[str, Any], items: list[tuple[str, float]], reasons: list[list[tuple[str, float]]] | None = None
) -> Response:
    """The response body built as plain data and serialised by orjson: the hot routes skip
    Pydantic's re-validation of their own output (their models still document /docs)."""
    body["items"] = [{"track_id": t, "score": s} for t, s in items]
    if reasons is not None:
        for item, why in zip(body["items"], reasons, strict=True):
            item["because"] = [{"track_id": t, "weight": w} for t, w in why]
    return Response(orjson.dumps(body), media_type="application/json")
