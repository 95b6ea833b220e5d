"""Parsing and validation of play events."""

from __future__ import annotations

import json

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from core.events import InvalidEvent, Limits, PlayEvent, checked_play, fast_play, parse_play

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


_ids = st.one_of(
    st.text(max_size=70),
    st.sampled_from(["u1", " u1", "u1 ", "\u2003", "\u2003x", "", "x" * 64, "x" * 65, "é" * 64, "😀" * 64, "😀" * 65]),
)
_values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**40), max_value=2**40),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0, 1, 1000, 1001, NOW, NOW + 86_400, NOW + 86_401, -0.0, float("nan")]),
    _ids,
)
_fields = ["user_id", "track_id", "ts", "ms_played", "count", "private", "event_id", "erase"]
_events = st.fixed_dictionaries(
    {"user_id": st.one_of(_ids, _values), "track_id": st.one_of(_ids, _values), "ts": _values},
    optional={k: _values for k in _fields[3:]},
)


@settings(max_examples=3000, deadline=None)
@given(_events)
def test_the_fast_path_accepts_only_what_the_checked_path_accepts_the_same_way(d: dict[str, object]) -> None:
    """`fast_play` (the decode stage's shortcut) never accepts an event the full checks reject,
    and builds the same event when both accept it; whatever it declines, the full checks decide."""
    raw = orjson.dumps(d)
    d = orjson.loads(raw)  # what the parser sees (NaN and infinities become null)
    fast = fast_play(d, LIM)
    checked = checked_play(d, raw, LIM)
    if fast is not None:
        assert checked == fast
    assert parse_play(raw, LIM) == checked


def test_the_fast_path_takes_the_common_event() -> None:
    ev = fast_play({"user_id": "u1", "track_id": "t1", "ts": NOW, "ms_played": 200_000, "event_id": "e"}, LIM)
    assert ev == PlayEvent("u1", "t1", NOW, 200_000, 1, False, "e")
