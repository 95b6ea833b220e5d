"""HistoryStore against a real Redis: offset fencing, aggregation, caps and pending work."""

from __future__ import annotations

import pytest
import redis

from services.config import Settings
from services.history_store import HistoryStore, Record
from services.keys import Keys

pytestmark = pytest.mark.integration


def _store(settings: Settings, r: redis.Redis, cap: int = 100) -> tuple[HistoryStore, Keys]:
    keys = Keys(settings.key_prefix)
    return HistoryStore(r, keys, "g", cap, 3), keys


def _hist(r: redis.Redis, keys: Keys, user: str) -> dict[str, float]:
    return {k.decode(): float(v) for k, v in r.hgetall(keys.history(user)).items()}


def test_partial_replay_applies_only_the_new_tail(settings: Settings, redis_client: redis.Redis) -> None:
    store, keys = _store(settings, redis_client)
    first = [Record(0, o, "p", "u1", f"t{o % 3}", 1.0, 10.0) for o in range(10)]
    assert store.apply("inc-a", first) == 10
    # A restart re-reads offsets 5..14 of partition 0 plus a fresh partition 1.
    again = [Record(0, o, "p", "u1", f"t{o % 3}", 1.0, 10.0) for o in range(5, 15)]
    again += [Record(1, o, "p", "u2", "t9", 2.0, 10.0) for o in range(3)]
    assert store.apply("inc-a", again) == 5 + 3
    expected: dict[str, float] = {}
    for o in range(15):
        expected[f"t{o % 3}"] = expected.get(f"t{o % 3}", 0.0) + 1.0
    assert _hist(redis_client, keys, "u1") == expected
    assert _hist(redis_client, keys, "u2") == {"t9": 6.0}
    assert store.applied_offsets("inc-a") == {0: 14, 1: 2}
    assert store.apply("inc-a", again) == 0  # a full replay changes nothing
    assert _hist(redis_client, keys, "u1") == expected
    # A new topic incarnation starts its offsets again from zero.
    assert store.apply("inc-b", [Record(0, 0, "p", "u1", "t0", 1.0, 10.0)]) == 1
    assert _hist(redis_client, keys, "u1")["t0"] == expected["t0"] + 1.0


def test_dead_letters_and_noops_advance_offsets_without_history(settings: Settings, redis_client: redis.Redis) -> None:
    store, keys = _store(settings, redis_client)
    recs = [
        Record(0, 0, "d", extra='{"raw": "x", "error": "bad", "source": "p/0/0"}'),
        Record(0, 1, "n", "u1", "t1"),
        Record(0, 2, "p", "u1", "t1", 1.0, 5.0),
    ]
    assert store.apply("inc", recs) == 3
    assert store.apply("inc", recs) == 0
    assert redis_client.llen(keys.pending_dlq) == 1  # once, not twice
    assert _hist(redis_client, keys, "u1") == {"t1": 1.0}


def test_cap_listeners_and_pending_cutoff(settings: Settings, redis_client: redis.Redis) -> None:
    store, keys = _store(settings, redis_client, cap=5)
    recs = [Record(0, o, "p", "heavy", f"t{o}", float(o + 1), float(o), "new" if o < 2 else "") for o in range(12)]
    recs += [Record(0, 12 + o, "p", f"l{o}", "t0", 1.0, 100.0 + o, "new") for o in range(6)]
    store.apply("inc", recs)
    assert set(_hist(redis_client, keys, "heavy")) == {f"t{o}" for o in range(7, 12)}  # the 5 heaviest
    # Only tracks unknown to the model keep listeners; capped at the 3 most recent.
    assert {u.decode() for u in redis_client.zrange(keys.listeners("t0"), 0, -1)} == {"l3", "l4", "l5"}
    assert redis_client.exists(keys.listeners("t5")) == 0
    assert {t.decode() for t in redis_client.smembers(keys.new_tracks)} == {"t0", "t1"}
    users, upto = store.pending(3)  # the whole first batch, although larger than the limit
    assert set(users) == {"heavy", *(f"l{o}" for o in range(6))}
    store.apply("inc", [Record(0, 30, "p", "late", "t1", 1.0, 1.0)])
    store.mark_done(upto)
    assert store.pending(10)[0] == ["late"]  # queued after the cut-off: still pending
