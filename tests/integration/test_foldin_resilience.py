"""The speed layer under rebalances and a Redis restart: nothing lost, nothing twice."""

from __future__ import annotations

import json
import time
import uuid
from collections import defaultdict
from collections.abc import Callable

import pytest
import redis

from core.synthetic import SyntheticMusic
from services.infra import kafka_admin as kafka_io
from services.infra.embedded import EmbeddedServers
from services.infra.keys import Keys
from services.infra.settings import Settings
from services.produce import PlayPublisher
from tests.integration.helpers import WorkerThread, applied_count, keys_for, publish_synthetic_model, wait_for

pytestmark = pytest.mark.integration


def _produce_expected(settings: Settings, events: list[dict], pub: PlayPublisher, expected: dict) -> None:
    for ev in events:
        pub.publish_raw(str(ev["user_id"]).encode(), json.dumps(ev).encode())
        if int(ev["ms_played"]) >= settings.min_ms_played:
            expected[str(ev["user_id"])][str(ev["track_id"])] += 1.0
    pub.flush()


def _stream(settings: Settings, r: redis.Redis, seed: int, n_events: int) -> tuple:
    """A published model, the topics, and synthetic events with their expected histories (empty yet)."""
    data = SyntheticMusic(n_users=300, n_tracks=200, seed=seed)
    publish_synthetic_model(settings, r, data)
    kafka_io.ensure_topics(settings)
    expected: dict = defaultdict(lambda: defaultdict(float))
    pub = PlayPublisher.connect(settings.kafka_bootstrap, settings.plays_topic)
    return keys_for(settings), f"g-{uuid.uuid4().hex[:6]}", list(data.events(n_events)), expected, pub


def _own_redis_settings(servers: dict, own: EmbeddedServers, prefix: str, tmp_path: object) -> tuple[str, Settings]:
    """Fresh topics and key prefix on the shared broker, state on a Redis of the test's own
    (one it may restart, stop or starve without hurting other tests)."""
    tag = uuid.uuid4().hex[:8]
    return tag, Settings(
        kafka_bootstrap=str(servers["kafka"]),
        redis_url=own.redis_url,
        plays_topic=f"plays-{tag}",
        dlq_topic=f"dlq-{tag}",
        updates_topic=f"up-{tag}",
        key_prefix=f"{prefix}-{tag}:",
        factors=16,
        data_dir=str(tmp_path),
    )


def _applied(r: redis.Redis, keys: Keys, group: str) -> int:
    return sum(int(v) + 1 for v in r.hgetall(keys.offsets(group)).values())


def _check(r: redis.Redis, keys: Keys, expected: dict) -> None:
    for user, tracks in expected.items():
        stored = {k.decode(): float(v) for k, v in r.hgetall(keys.history(user)).items()}
        assert stored == dict(tracks), user


@pytest.mark.both_topologies
def test_two_workers_and_rebalances_lose_nothing(settings: Settings, redis_client: redis.Redis) -> None:
    keys, group, events, expected, pub = _stream(settings, redis_client, seed=12, n_events=6000)
    a = WorkerThread(settings, group)
    _produce_expected(settings, events[:2000], pub, expected)
    b = WorkerThread(settings, group)  # joins: rebalance
    _produce_expected(settings, events[2000:4000], pub, expected)
    assert wait_for(lambda: bool(b.worker.consumer.assignment()), timeout=30)
    a.stop()  # leaves: rebalance again, b takes every partition
    _produce_expected(settings, events[4000:], pub, expected)
    try:
        assert wait_for(lambda: applied_count(settings, group) >= len(events), timeout=90)
    finally:
        b.stop()
    _check(redis_client, keys, expected)


def test_redis_restart_mid_stream_loses_nothing(servers: dict, tmp_path) -> None:
    own = EmbeddedServers.start(kafka=False)  # a Redis of its own, so the restart hurts no other test
    try:
        _, settings = _own_redis_settings(servers, own, "r", tmp_path)
        r = redis.Redis.from_url(own.redis_url)
        keys, group, events, expected, pub = _stream(settings, r, seed=13, n_events=4000)
        w = WorkerThread(settings, group)
        _produce_expected(settings, events[:2000], pub, expected)
        assert wait_for(lambda: _applied(r, keys, group) > 0, timeout=30)
        time.sleep(1.5)  # let appendfsync everysec persist what is applied
        own.restart_redis(down_s=2.0)
        _produce_expected(settings, events[2000:], pub, expected)
        try:
            assert wait_for(lambda: _applied(r, keys, group) >= len(events), timeout=90)
        finally:
            w.stop()
        _check(r, keys, expected)
    finally:
        own.stop()


def test_redis_restored_from_older_snapshot_is_replayed(settings: Settings, redis_client: redis.Redis) -> None:
    """Redis rolled back behind the committed Kafka offsets, twice: once under a running worker
    (it notices the stored offsets went backwards and rewinds), once while no worker runs (the
    next one seeks to the stored offsets, not the group's). Histories end exact."""
    from prometheus_client import REGISTRY

    from bench.chaos_stream import read_topic
    from bench.faults import restore, snapshot

    def rewinds() -> float:
        return REGISTRY.get_sample_value("encore_state_rewinds_total") or 0.0

    r = redis_client
    keys, group, events, expected, pub = _stream(settings, r, seed=14, n_events=6000)
    bad_sent: list[bytes] = []

    def produce(chunk: list[dict]) -> None:  # plays, and one malformed event per 100 of them
        for _ in range(0, len(chunk), 100):
            bad = f'{{"bad": "b{len(bad_sent)}"'.encode()
            bad_sent.append(bad)
            pub.publish_raw(b"x", bad)
        _produce_expected(settings, chunk, pub, expected)

    def all_applied(n_plays: int) -> Callable[[], bool]:
        return lambda: _applied(r, keys, group) >= n_plays + len(bad_sent)

    w = WorkerThread(settings, group)
    produce(events[:1500])
    assert wait_for(all_applied(1500), timeout=60)
    old = snapshot(r, settings.key_prefix)
    produce(events[1500:3000])
    assert wait_for(all_applied(3000), timeout=60)
    before = rewinds()
    restore(r, settings.key_prefix, old)  # under the running worker
    produce(events[3000:4000])
    try:
        assert wait_for(all_applied(4000), timeout=90)
    finally:
        w.stop()
    _check(r, keys, expected)
    assert rewinds() > before, "the running worker noticed the rollback and rewound"
    old = snapshot(r, settings.key_prefix)
    produce(events[4000:5000])
    w2 = WorkerThread(settings, group)
    assert wait_for(all_applied(5000), timeout=60)
    w2.stop()
    restore(r, settings.key_prefix, old)  # Kafka's committed offsets now lie ahead of the state
    produce(events[5000:])
    w3 = WorkerThread(settings, group)
    try:
        assert wait_for(all_applied(len(events)), timeout=90)
    finally:
        w3.stop()
    _check(r, keys, expected)
    letters = [v for v, _ in read_topic(settings.kafka_bootstrap, settings.dlq_topic)]
    assert sorted(letters) == sorted(bad_sent)  # every malformed event exactly once, across two rollbacks


def test_redis_at_maxmemory_refuses_whole_batches_then_heals_exactly(servers: dict, tmp_path) -> None:
    from prometheus_client import REGISTRY

    own = EmbeddedServers.start(kafka=False)
    try:
        tag, settings = _own_redis_settings(servers, own, "m", tmp_path)
        r = redis.Redis.from_url(own.redis_url)
        keys, group, events, expected, pub = _stream(settings, r, seed=15, n_events=3000)
        w = WorkerThread(settings, group)
        _produce_expected(settings, events[:1000], pub, expected)
        assert wait_for(lambda: _applied(r, keys, group) >= 1000, timeout=60)
        before = {k: r.dump(k) for k in r.scan_iter(match=f"m-{tag}:plays:*")}
        offsets = r.hgetall(keys.offsets(group))
        ooms = REGISTRY.get_sample_value("encore_redis_oom_total") or 0.0
        r.config_set("maxmemory", str(int(r.info("memory")["used_memory"]) // 2))
        r.config_set("maxmemory-policy", "noeviction")
        _produce_expected(settings, events[1000:], pub, expected)
        assert wait_for(lambda: (REGISTRY.get_sample_value("encore_redis_oom_total") or 0.0) > ooms, timeout=30)
        # Refused whole: no history and no offset moved.
        assert r.hgetall(keys.offsets(group)) == offsets
        assert {k: r.dump(k) for k in r.scan_iter(match=f"m-{tag}:plays:*")} == before
        r.config_set("maxmemory", "0")
        try:
            assert wait_for(lambda: _applied(r, keys, group) >= len(events), timeout=60)
        finally:
            w.stop()
        _check(r, keys, expected)
    finally:
        own.stop()
