"""The `plays` event: parsing and validation into values, never exceptions that stop a loop."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, NamedTuple

import orjson

MAX_ID_BYTES = 256
FAST_ID_CHARS = MAX_ID_BYTES // 4  # UTF-8 needs at most 4 bytes per character


class PlayEvent(NamedTuple):
    """A valid play. `weight` is what it adds to the user's history (0 for skips). A NamedTuple,
    immutable like the frozen dataclass it was, because one is built per consumed event and a
    NamedTuple is built in a third of the time."""

    user_id: str
    track_id: str
    ts: float
    ms_played: int | None
    count: int  # type: ignore[assignment]  # the field hides tuple.count, which nothing here calls
    private: bool
    event_id: str | None

    def weight(self, min_ms_played: int) -> float:
        if self.private:
            return 0.0
        if self.ms_played is not None and self.ms_played < min_ms_played:
            return 0.0
        return float(self.count)

    def to_json(self) -> bytes:
        d: dict[str, object] = {
            "v": 1,
            "user_id": self.user_id,
            "track_id": self.track_id,
            "ts": self.ts,
            "count": self.count,
            "private": self.private,
        }
        if self.ms_played is not None:
            d["ms_played"] = self.ms_played
        if self.event_id is not None:
            d["event_id"] = self.event_id
        return json.dumps(d, separators=(",", ":")).encode()


@dataclass(frozen=True)
class EraseEvent:
    """A control record on `plays`: forget `user_id` (right to erasure). Keyed by the user id
    like their plays, it sits after every play of theirs produced before it, so whoever reads
    the topic in order drops those plays and keeps the ones after it."""

    user_id: str

    def to_json(self) -> bytes:
        return json.dumps({"v": 1, "erase": True, "user_id": self.user_id}, separators=(",", ":")).encode()


@dataclass(frozen=True)
class InvalidEvent:
    """A dead letter: the original bytes and why they were rejected."""

    raw: bytes
    reason: str


@dataclass(frozen=True)
class Limits:
    """Validation bounds; `now` is the clock used for the future-timestamp check."""

    now: float
    max_future_s: float = 86_400.0
    max_count: int = 1000


def _check_id(d: dict[str, object], name: str) -> str:
    v = d.get(name)
    if not isinstance(v, str) or not v.strip():
        raise ValueError(f"{name} must be a non-empty string")
    if len(v.encode()) > MAX_ID_BYTES:
        raise ValueError(f"{name} longer than {MAX_ID_BYTES} bytes")
    return v


def _int(d: dict[str, object], name: str) -> int | None:
    v = d.get(name)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int):
        raise ValueError(f"{name} must be an integer")
    return v


def parse_play(raw: bytes | None, limits: Limits) -> PlayEvent | EraseEvent | InvalidEvent:
    """Parse one `plays` message value; anything invalid becomes an InvalidEvent."""
    if raw is None:
        return InvalidEvent(b"", "null message value")
    try:
        d = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        return InvalidEvent(raw, f"malformed JSON: {exc}"[:200])
    if not isinstance(d, dict):
        return InvalidEvent(raw, "event must be a JSON object")
    return fast_play(d, limits) or checked_play(d, raw, limits)


def fast_play(d: dict[str, Any], limits: Limits) -> PlayEvent | None:
    """The common well-formed play in one pass of cheap checks, or None: then `checked_play`
    decides, with the reason. Every event accepted here is one `checked_play` accepts the same
    way (tests/unit/test_events.py checks it on generated events); it is the speed layer's
    decode stage, run once per consumed event."""
    u, t, ts = d.get("user_id"), d.get("track_id"), d.get("ts")
    ms, count, private, event_id = d.get("ms_played"), d.get("count"), d.get("private", False), d.get("event_id")
    if count is None:
        count = 1
    if (
        type(u) is str
        and type(t) is str
        and 0 < len(u) <= FAST_ID_CHARS
        and 0 < len(t) <= FAST_ID_CHARS
        and not u[0].isspace()
        and not t[0].isspace()
        and (type(ts) is float or type(ts) is int)
        and 0 <= ts <= limits.now + limits.max_future_s  # also false for NaN and infinities
        and (ms is None or (type(ms) is int and ms >= 0))
        and type(count) is int
        and 1 <= count <= limits.max_count
        and (private is False or private is True)
        and (event_id is None or type(event_id) is str)
        and "erase" not in d
    ):
        return PlayEvent(u, t, float(ts), ms, count, private, event_id)
    return None


def checked_play(d: dict[str, Any], raw: bytes, limits: Limits) -> PlayEvent | EraseEvent | InvalidEvent:
    """Every check in order, so an invalid event gets the reason for its first fault."""
    if "erase" in d:
        if d["erase"] is not True:
            return InvalidEvent(raw, "erase must be true when present")
        try:
            return EraseEvent(_check_id(d, "user_id"))
        except ValueError as exc:
            return InvalidEvent(raw, str(exc))
    try:
        user_id = _check_id(d, "user_id")
        track_id = _check_id(d, "track_id")
        ts = d.get("ts")
        if isinstance(ts, bool) or not isinstance(ts, int | float) or not math.isfinite(ts):
            raise ValueError("ts must be a finite number (epoch seconds)")
        if ts < 0:
            raise ValueError("ts must not be negative")
        if ts > limits.now + limits.max_future_s:
            raise ValueError("ts is too far in the future")
        ms = _int(d, "ms_played")
        if ms is not None and ms < 0:
            raise ValueError("ms_played must be >= 0")
        count = _int(d, "count")
        count = 1 if count is None else count
        if count < 1:
            raise ValueError("count must be >= 1")
        if count > limits.max_count:
            raise ValueError(f"count above the maximum of {limits.max_count}")
        private = d.get("private", False)
        if not isinstance(private, bool):
            raise ValueError("private must be a boolean")
        event_id = d.get("event_id")
        if event_id is not None and not isinstance(event_id, str):
            raise ValueError("event_id must be a string")
    except ValueError as exc:
        return InvalidEvent(raw, str(exc))
    return PlayEvent(user_id, track_id, float(ts), ms, count, private, event_id)
