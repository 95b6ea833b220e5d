"""The speed layer against a real broker and Redis."""

from __future__ import annotations

import json
import time
import uuid

import numpy as np
import pytest
import redis

from core.messages import decode_vector
from core.synthetic import SyntheticMusic
from services.infra import kafka_admin as kafka_io
from services.infra.settings import Settings
from services.produce import PlayPublisher
from tests.integration.helpers import WorkerThread, consume_all, keys_for, publish_synthetic_model, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.both_topologies]


def test_play_to_vector_history_and_dlq(settings: Settings, redis_client: redis.Redis) -> None:
    data = SyntheticMusic(n_users=300, n_tracks=200, seed=2)
    version = publish_synthetic_model(settings, redis_client, data)
    keys = keys_for(settings)
    kafka_io.ensure_topics(settings)
    worker = WorkerThread(settings, f"g-{uuid.uuid4().hex[:6]}")
    try:
        pub = PlayPublisher.connect(settings.kafka_bootstrap, settings.plays_topic)
        new_user = "brand-new-user"
        for t in ("t1", "t2", "t3", "t1"):
            pub.publish(new_user, t, ms_played=200_000)
        pub.publish(new_user, "t4", ms_played=2_000)  # a skip: no weight
        pub.publish(new_user, "t5", ms_played=200_000, private=True)  # never stored
        bad = [b"{oops", json.dumps({"user_id": "x", "track_id": "t1", "ts": 1, "count": 0}).encode()]
        for b in bad:
            pub.publish_raw(b"x", b)
        pub.publish("u7", "t9", ms_played=100_000)
        pub.flush()
        assert wait_for(lambda: redis_client.exists(keys.user(version, new_user)) == 1)
        assert wait_for(lambda: redis_client.hget(keys.history("u7"), "t9") is not None)
        hist = {k.decode(): float(v) for k, v in redis_client.hgetall(keys.history(new_user)).items()}
        assert hist == {"t1": 2.0, "t2": 1.0, "t3": 1.0}
        vec = decode_vector(redis_client.get(keys.user(version, new_user)))
        assert vec.shape == (settings.factors,) and np.linalg.norm(vec) > 0
        dlq = consume_all(settings, settings.dlq_topic, 2)
        assert sorted(r.value for r in dlq) == sorted(bad)
        reasons = [dict(r.headers)["error"].decode() for r in dlq]
        assert any("malformed JSON" in x for x in reasons) and any("count" in x for x in reasons)
        updates = consume_all(settings, settings.updates_topic, 1)
        assert any(r.key == f"user:{new_user}".encode() for r in updates)
    finally:
        worker.stop()


def test_new_track_cold_start(settings: Settings, redis_client: redis.Redis) -> None:
    settings = settings.with_(cold_start_min_listeners=3)
    data = SyntheticMusic(n_users=300, n_tracks=200, seed=3)
    version = publish_synthetic_model(settings, redis_client, data)
    keys = keys_for(settings)
    worker = WorkerThread(settings, f"g-{uuid.uuid4().hex[:6]}")
    try:
        pub = PlayPublisher.connect(settings.kafka_bootstrap, settings.plays_topic)
        for u in ("u1", "u2"):
            pub.publish(u, "brand-new-track", ms_played=100_000)
        pub.flush()
        assert wait_for(lambda: redis_client.hget(keys.history("u2"), "brand-new-track") is not None)
        time.sleep(0.5)
        assert redis_client.get(keys.track(version, "brand-new-track")) is None
        pub.publish("u3", "brand-new-track", ms_played=100_000)
        pub.flush()
        assert wait_for(lambda: redis_client.get(keys.track(version, "brand-new-track")) is not None)
    finally:
        worker.stop()
