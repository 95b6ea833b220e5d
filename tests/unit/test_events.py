"""Parsing and validation of play events."""

from __future__ import annotations

import json

import pytest

from core.events import InvalidEvent, Limits, PlayEvent, parse_play

pytestmark = pytest.mark.unit
NOW = 1_700_000_000.0
LIM = Limits(now=NOW)


def _raw(**kw: object) -> bytes:
    d = {"user_id": "u1", "track_id": "t1", "ts": NOW, "ms_played": 200_000}
    d.update(kw)
    return json.dumps({k: v for k, v in d.items() if v is not ...}).encode()


def test_valid_event_and_weights() -> None:
    ev = parse_play(_raw(count=3, extra="ignored"), LIM)
    assert isinstance(ev, PlayEvent)
    assert ev.weight(30_000) == 3.0
    assert parse_play(_raw(ms_played=1000), LIM).weight(30_000) == 0.0  # type: ignore[union-attr]
    assert parse_play(_raw(private=True), LIM).weight(30_000) == 0.0  # type: ignore[union-attr]
    assert parse_play(_raw(ms_played=...), LIM).weight(30_000) == 1.0  # type: ignore[union-attr]
    assert parse_play(ev.to_json(), LIM) == ev


@pytest.mark.parametrize(
    "raw, reason",
    [
        (b"{not json", "malformed JSON"),
        (b"\xff\xfe", "malformed JSON"),
        (b"[1,2]", "JSON object"),
        (_raw(user_id=...), "user_id"),
        (_raw(user_id=""), "user_id"),
        (_raw(track_id=7), "track_id"),
        (_raw(track_id="x" * 257), "longer than 256"),
        (_raw(ts="yesterday"), "ts must be"),
        (_raw(ts=NOW + 10 * 86_400), "future"),
        (_raw(count=0), "count must be >= 1"),
        (_raw(count=-2), "count must be >= 1"),
        (_raw(count=10**9), "maximum"),
        (_raw(count=1.5), "integer"),
        (_raw(ms_played=-1), "ms_played"),
        (_raw(private="yes"), "private"),
        (None, "null"),
    ],
)
def test_invalid_events_become_values(raw: bytes | None, reason: str) -> None:
    out = parse_play(raw, LIM)
    assert isinstance(out, InvalidEvent)
    assert reason in out.reason
    assert out.raw == (raw or b"")
