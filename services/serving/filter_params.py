"""The catalogue filter as query parameters, shared by every recommendation route.

`exclude` and `tags` take repeated parameters, comma-separated lists, or both
(`?exclude=t1,t2&exclude=t3`).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Annotated

from fastapi import Query
from pydantic import StringConstraints

from core.filters import TrackFilter
from services.serving.http_models import MAX_ID_LENGTH

MAX_EXCLUDE = 1000
MAX_TAGS = 20
Id = Annotated[str, StringConstraints(max_length=MAX_ID_LENGTH)]
Tag = Annotated[str, StringConstraints(max_length=64)]
EXCLUDE_DOC = "track ids to leave out (repeated and/or comma-separated)"
TAGS_DOC = "keep tracks with any of these catalogue tags (repeated and/or comma-separated)"


def split_ids(values: list[str]) -> list[str]:
    """Repeated values and comma-separated lists, as one list (the schema bounds both: at most
    so many values of at most so many characters each)."""
    return [v.strip() for raw in values for v in raw.split(",") if v.strip()]


def filter_params(max_n: int) -> Callable[..., Awaitable[TrackFilter]]:
    """A FastAPI dependency building the request's TrackFilter (documented in /docs); `async`
    so that FastAPI calls it on the event loop rather than its thread pool (a thread hop per
    request for a few microseconds of work)."""

    async def params(
        # Plain `[]` defaults, not `default_factory=list`: pydantic inspects a default factory's
        # signature on every request (for a builtin by parsing its text signature), which was
        # a tenth of a serve worker's time at 700 requests/s (py-spy). FastAPI copies defaults.
        exclude: Annotated[list[Id], Query(max_length=MAX_EXCLUDE, description=EXCLUDE_DOC)] = [],  # noqa: B006
        tags: Annotated[list[Tag], Query(max_length=MAX_TAGS, description=TAGS_DOC)] = [],  # noqa: B006
        explicit: bool = Query(True, description="false: leave out tracks the catalogue marks explicit"),
        region: str | None = Query(
            None, pattern="^[A-Za-z]{2}$", description="keep tracks available in this region (ISO 3166 code)"
        ),
        max_per_artist: int | None = Query(None, ge=1, le=max_n, description="at most this many tracks per artist"),
    ) -> TrackFilter:
        return TrackFilter(
            frozenset(split_ids(exclude)),
            explicit,
            region.upper() if region else None,
            frozenset(t.lower() for t in split_ids(tags)),
            max_per_artist,
        )

    return params
