"""Consumed play messages reduced to what the history store applies, as typed records.

Records are built once per event on the hot path, so they are NamedTuples (cheap to make);
the three kinds replace a one-letter tag: a play that adds weight, a message that only moves
the offset (a skip or a private play), and a dead letter.
"""

from __future__ import annotations

from typing import NamedTuple, Protocol

from core.events import InvalidEvent, Limits, PlayEvent, parse_play
from core.messages import DeadLetter


class PlayRecord(NamedTuple):
    partition: int
    offset: int
    user: str
    track: str
    weight: float
    ts: float
    new_track: bool = False  # unknown to the current model: keeps recent listeners for cold start


class SkipRecord(NamedTuple):
    """Valid, but adds no weight (a skip, a private play): it only advances the offset."""

    partition: int
    offset: int


class EraseRecord(NamedTuple):
    """Forget `user` (an EraseEvent): their earlier plays are dropped, later ones start anew."""

    partition: int
    offset: int
    user: str


class DeadRecord(NamedTuple):
    partition: int
    offset: int
    letter: DeadLetter


Record = PlayRecord | SkipRecord | DeadRecord | EraseRecord


class Message(Protocol):
    """What the speed layer reads of a consumed message (confluent-kafka's Message fits)."""

    def topic(self) -> str | None: ...
    def partition(self) -> int | None: ...
    def offset(self) -> int | None: ...
    def value(self) -> bytes | None: ...


def to_records(messages: list[Message], limits: Limits, min_ms_played: int, known: dict[str, int]) -> list[Record]:
    """Parse and classify every message; invalid ones become dead letters, never exceptions."""
    out: list[Record] = []
    add = out.append
    for m in messages:
        part, off = m.partition() or 0, m.offset() or 0
        ev = parse_play(m.value(), limits)
        if isinstance(ev, PlayEvent):  # the common case first: this loop runs once per consumed event
            w = ev.weight(min_ms_played)
            add(
                PlayRecord(part, off, ev.user_id, ev.track_id, w, ev.ts, ev.track_id not in known)
                if w > 0
                else SkipRecord(part, off)
            )
        elif isinstance(ev, InvalidEvent):
            add(DeadRecord(part, off, DeadLetter(ev.raw, ev.reason, f"{m.topic()}/{part}/{off}")))
        else:
            add(EraseRecord(part, off, ev.user_id))
    return out


def without_erased_plays(records: list[Record]) -> list[Record]:
    """The batch with every play of an erased user that precedes their erase record turned into
    a skip (it still advances the offset): those plays were made before the erasure."""
    last_erase = {r.user: i for i, r in enumerate(records) if isinstance(r, EraseRecord)}
    if not last_erase:
        return records
    return [
        SkipRecord(r.partition, r.offset) if isinstance(r, PlayRecord) and i < last_erase.get(r.user, -1) else r
        for i, r in enumerate(records)
    ]


def last_offsets(messages: list[Message]) -> dict[int, int]:
    """The highest offset seen per partition: what a commit after this batch covers."""
    last: dict[int, int] = {}
    for m in messages:
        p, o = m.partition() or 0, m.offset() or 0
        if o > last.get(p, -1):
            last[p] = o
    return last
