"""What every answer of the read routes is made of: the body builder and the request id."""

from __future__ import annotations

import itertools
import os
from typing import Any

import orjson
from fastapi import Response

_ids: tuple[int, str, itertools.count[int]] = (0, "", itertools.count())


def request_id() -> str:
    """A unique id in uuid4's hex form without a urandom call per request (1 % of a serve
    worker): a random 64-bit prefix, drawn again in each process (workers are forked), and a
    counter."""
    global _ids
    pid, prefix, counter = _ids
    if pid != os.getpid():
        _ids = pid, prefix, counter = os.getpid(), os.urandom(8).hex(), itertools.count()
    return f"{prefix}{next(counter):016x}"


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
