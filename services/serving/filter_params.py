"""The catalogue filter as query parameters, shared by every recommendation route.

`exclude` and `tags` take repeated parameters, comma-separated lists, or both
(`?exclude=t1,t2&exclude=t3`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated

from fastapi import HTTPException, Query

from core.filters import TrackFilter
from services.serving.http_models import MAX_ID_LENGTH

MAX_EXCLUDE = 1000
MAX_TAGS = 20


def split_ids(values: list[str] | None, name: str, limit: int) -> list[str]:
    out = [v.strip() for raw in values or () for v in raw.split(",") if v.strip()]
    if len(out) > limit:
        raise HTTPException(422, f"{name}: at most {limit} values")
    if any(len(v) > MAX_ID_LENGTH for v in out):
        raise HTTPException(422, f"{name}: a value is longer than {MAX_ID_LENGTH} characters")
    return out


def filter_params(max_n: int) -> Callable[..., TrackFilter]:
    """A FastAPI dependency building the request's TrackFilter (documented in /docs)."""

    def params(
        exclude: Annotated[
            list[str] | None, Query(description="track ids to leave out (repeated or comma-separated)")
        ] = None,
        explicit: bool = Query(True, description="false: leave out tracks the catalogue marks explicit"),
        region: str | None = Query(
            None, pattern="^[A-Za-z]{2}$", description="keep tracks available in this region (ISO 3166 code)"
        ),
        tags: Annotated[list[str] | None, Query(description="keep tracks with any of these catalogue tags")] = None,
        max_per_artist: int | None = Query(None, ge=1, le=max_n, description="at most this many tracks per artist"),
    ) -> TrackFilter:
        return TrackFilter(
            frozenset(split_ids(exclude, "exclude", MAX_EXCLUDE)),
            explicit,
            region.upper() if region else None,
            frozenset(t.lower() for t in split_ids(tags, "tags", MAX_TAGS)),
            max_per_artist,
        )

    return params
