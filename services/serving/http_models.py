"""Request and response bodies of the HTTP API (they document /docs; hot routes build the same
shapes as plain data and serialise them with orjson)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

MAX_ID_LENGTH = 256
MAX_ANONYMOUS_PLAYS = 10_000


class Reason(BaseModel):
    track_id: str = Field(description="a track the listener played")
    weight: float = Field(description="its exact part of the item's score (see README: explanations)")


class Item(BaseModel):
    track_id: str
    score: float
    because: list[Reason] | None = Field(default=None, description="with explain=true: the largest contributions")


ARM = "the experiment arm that answered (`current` outside an experiment, and for routes without a user)"


class Recommendations(BaseModel):
    user_id: str | None = None
    model_version: str
    source: Literal["personal", "popular"]
    request_id: str = Field(description="names this answer in the `impressions` topic")
    arm: str = Field(description=ARM)
    items: list[Item]


class Similar(BaseModel):
    track_id: str
    model_version: str
    request_id: str
    arm: str = Field(description=ARM)
    items: list[Item]


class Play(BaseModel):
    track_id: str = Field(min_length=1, max_length=MAX_ID_LENGTH)
    count: float = Field(default=1.0, gt=0, le=1e6)


class AnonymousRequest(BaseModel):
    plays: list[Play] = Field(max_length=MAX_ANONYMOUS_PLAYS)
    n: int = Field(default=10, ge=1)


class Artist(BaseModel):
    artist_id: str
    score: float


class SimilarArtists(BaseModel):
    artist_id: str
    model_version: str
    items: list[Artist]


class Radio(BaseModel):
    seed: str = Field(description="track:ID or artist:ID")
    user_id: str | None = None
    model_version: str
    items: list[Item]


class TrackState(BaseModel):
    track_id: str
    available: bool


class Forgotten(BaseModel):
    user_id: str
    erase_record: str = Field(description="topic/partition/offset of the erase record in plays")
    erased_now: bool = Field(description="false when the speed layer had already applied the record")


class Error(BaseModel):
    detail: str


class Activated(BaseModel):
    current: str
    previous: str | None


class IndexState(BaseModel):
    ef: int = Field(description="the widest band's search breadth")
    ef_per_band: list[int] = Field(default=[], description="breadth per norm band, longest vectors first")
    recall_at_10: float | None = Field(default=None, alias="recall@10")
    recall_at_10_lower_95: float | None = Field(default=None, alias="recall@10_lower_95")


class Ready(BaseModel):
    ready: Literal[True]
    model_version: str
    tracks: int
    index: dict[str, IndexState]


class NotReady(BaseModel):
    ready: Literal[False]
    reason: str
