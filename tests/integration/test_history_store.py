"""The HistoryStore contract: offset fencing, aggregation, caps, pending work and dead letters.

One suite, every implementation: the Redis adapter on a real Redis, the bucketed adapter on a
real Redis Cluster (3 masters, 3 replicas), and the in-memory fake the speed layer's unit tests
rely on (so neither can drift from what one Redis does).
"""

from __future__ import annotations

import numpy as np
import pytest
import redis

from core.messages import DeadLetter, encode_vectors
from services.infra.keys import Keys
from services.infra.settings import Settings
from services.speed.cluster_history_store import ClusterHistoryStore
from services.speed.history_store import RedisHistoryStore
from services.speed.records import DeadRecord, PlayRecord, SkipRecord
from tests.fakes import FakeHistoryStore, FakeModelStore

pytestmark = pytest.mark.integration


@pytest.fixture(params=["redis", "cluster", "fake"])
def make_store(request, settings: Settings):
    clients: list[redis.Redis | redis.RedisCluster] = []

    def make(history_cap: int = 100, listeners_cap: int = 3):
        if request.param == "fake":
            fake = FakeHistoryStore(history_cap, listeners_cap)
            fake.models = FakeModelStore()
            return fake
        if request.param == "cluster":
            rc = redis.RedisCluster.from_url(request.getfixturevalue("redis_cluster_url"))
            clients.append(rc)
            keys = Keys(settings.key_prefix, buckets=16)
            return ClusterHistoryStore(rc, keys, "g", history_cap, listeners_cap)
        r = request.getfixturevalue("redis_client")
        return RedisHistoryStore(r, Keys(settings.key_prefix), "g", history_cap, listeners_cap)

    yield make
    for c in clients:
        c.close()


def _vector(store, version: str, user: str) -> bytes | None:
    if isinstance(store, FakeHistoryStore):
        assert store.models is not None
        return store.models.users.get((version, user))
    return store.r.get(store.keys.user(version, user))  # type: ignore[no-any-return]


def _hist(store, user: str) -> dict[str, float]:
    flat = store.raw_histories([user])[0]
    return {flat[i].decode(): float(flat[i + 1]) for i in range(0, len(flat), 2)}


def test_partial_replay_applies_only_the_new_tail(make_store) -> None:
    store = make_store()
    first = [PlayRecord(0, o, "u1", f"t{o % 3}", 1.0, 10.0) for o in range(10)]
    assert store.apply("inc-a", first) == 10
    # A restart re-reads offsets 5..14 of partition 0 plus a fresh partition 1.
    again = [PlayRecord(0, o, "u1", f"t{o % 3}", 1.0, 10.0) for o in range(5, 15)]
    again += [PlayRecord(1, o, "u2", "t9", 2.0, 10.0) for o in range(3)]
    assert store.apply("inc-a", again) == 5 + 3
    expected: dict[str, float] = {}
    for o in range(15):
        expected[f"t{o % 3}"] = expected.get(f"t{o % 3}", 0.0) + 1.0
    assert _hist(store, "u1") == expected
    assert _hist(store, "u2") == {"t9": 6.0}
    assert store.applied_offsets("inc-a") == {0: 14, 1: 2}
    assert store.apply("inc-a", again) == 0  # a full replay changes nothing
    assert _hist(store, "u1") == expected
    # A new topic incarnation starts its offsets again from zero.
    assert store.apply("inc-b", [PlayRecord(0, 0, "u1", "t0", 1.0, 10.0)]) == 1
    assert _hist(store, "u1")["t0"] == expected["t0"] + 1.0


def test_dead_letters_and_skips_advance_offsets_without_history(make_store) -> None:
    store = make_store()
    letter = DeadLetter(b"\xff not json", "malformed JSON", "plays/0/0")
    other = DeadLetter(b"{", "malformed JSON", "plays/2/7")
    recs = [DeadRecord(0, 0, letter), SkipRecord(0, 1), PlayRecord(0, 2, "u1", "t1", 1.0, 5.0), DeadRecord(2, 7, other)]
    assert store.apply("inc", recs) == 4
    assert store.apply("inc", recs) == 0
    assert store.dead_letters([0, 1, 2]) == {0: [letter], 2: [other]}  # once, not twice; raw bytes kept
    assert store.dead_letters([2]) == {2: [other]}  # a worker sees only its partitions' letters
    assert _hist(store, "u1") == {"t1": 1.0}
    store.settle({0: 1}, None)
    assert store.dead_letters([0, 1, 2]) == {2: [other]}


def test_cap_listeners_and_pending_cutoff(make_store) -> None:
    store = make_store(history_cap=5)
    recs = [PlayRecord(0, o, "heavy", f"t{o}", float(o + 1), float(o), o < 2) for o in range(12)]
    recs += [PlayRecord(0, 12 + o, f"l{o}", "t0", 1.0, 100.0 + o, True) for o in range(6)]
    store.apply("inc", recs)
    assert set(_hist(store, "heavy")) == {f"t{o}" for o in range(7, 12)}  # the 5 heaviest
    # Only tracks unknown to the model keep listeners; capped at the 3 most recent.
    listeners, weights = store.listener_weights("t0")
    assert set(listeners) == {"l3", "l4", "l5"} and weights == [1.0, 1.0, 1.0]
    assert store.listener_weights("t5") == ([], [])
    assert set(store.new_tracks()) == {"t0", "t1"}
    users, upto = store.pending(3)  # the whole first batch, although larger than the limit
    assert set(users) == {"heavy", *(f"l{o}" for o in range(6))}
    store.apply("inc", [PlayRecord(0, 30, "late", "t1", 1.0, 1.0)])
    store.settle({}, upto)
    assert store.pending(10)[0] == ["late"]  # queued after the cut-off: still pending
    store.queue_users(["heavy"])
    assert set(store.pending(10)[0]) == {"late", "heavy"}
    store.forget_new_tracks(["t1"])
    assert store.new_tracks() == ["t0"]


def test_a_vector_solved_before_an_erasure_is_not_written_back(make_store) -> None:
    """A worker takes users off the queue's head and reads their histories; one of them is erased
    meanwhile (by the API or by another worker). Writing the step's vectors stores the others
    and leaves the erased user out, in every topology (user ids need not be ASCII)."""
    store = make_store()
    store.apply("inc", [PlayRecord(0, 0, "gøne", "t1", 1.0, 10.0), PlayRecord(0, 1, "képt", "t1", 1.0, 10.0)])
    users, _ = store.pending(10)
    assert sorted(users) == ["gøne", "képt"]
    assert store.erase("inc", 0, 5, "gøne", ["v1"], hold=True)
    vectors = np.arange(2 * 4, dtype=np.float32).reshape(2, 4)
    assert store.put_vectors("v1", users, vectors) == {"gøne"}
    kept = users.index("képt")
    assert _vector(store, "v1", "gøne") is None
    assert _vector(store, "v1", "képt") == vectors[kept].astype("<f4").tobytes()


def _flush_scripts_on_one_node(store) -> None:
    """What a failover leaves: a master (a promoted replica) without the scripts in its cache."""
    if isinstance(store, ClusterHistoryStore):
        store.r.get_primaries()[0].redis_connection.script_flush()
    else:
        store.r.script_flush()


def test_a_server_without_the_scripts_gets_them_and_nothing_runs_twice(make_store) -> None:
    store = make_store()
    if isinstance(store, FakeHistoryStore):
        pytest.skip("no script cache in memory")
    users = [f"u{i}" for i in range(40)]  # spread over every master's buckets
    store.apply("inc", [PlayRecord(0, o, u, "t1", 1.0, 5.0) for o, u in enumerate(users)])
    _flush_scripts_on_one_node(store)
    store.apply("inc", [PlayRecord(0, 40 + o, u, "t1", 2.0, 6.0) for o, u in enumerate(users)])
    assert all(_hist(store, u) == {"t1": 3.0} for u in users)  # each step applied once
    _flush_scripts_on_one_node(store)
    vectors = np.arange(40 * 4, dtype=np.float32).reshape(40, 4)
    assert store.put_vectors("v1", users, vectors) == set()
    assert [_vector(store, "v1", u) for u in users] == encode_vectors(vectors)
    store.settle({}, store.pending(100)[1])  # the queue emptied
    _flush_scripts_on_one_node(store)
    store.queue_users(users[:3])
    assert set(store.pending(10)[0]) == set(users[:3])
