"""Forgetting a user on real servers: at once, fenced against replays, kept out of retrains."""

from __future__ import annotations

import time

import numpy as np
import pytest
import redis
from fastapi.testclient import TestClient

from core.synthetic import SyntheticMusic
from services.batch.checkpoint import PlayMatrix
from services.cli.produce import produce, synthetic_stream
from services.cli.root import Root
from services.infra.checked_files import read_npz
from services.infra.settings import Settings
from services.produce import PlayPublisher
from services.speed.records import EraseRecord, PlayRecord, SkipRecord
from services.speed.worker import GROUP
from tests.integration.helpers import WorkerThread, encore, keys_for, publish_synthetic_model, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.both_topologies]


def _history(r: redis.Redis, key: str) -> dict[str, float]:
    return {k.decode(): float(v) for k, v in r.hgetall(key).items()}


def test_the_erasure_fence_blocks_earlier_plays_and_lets_later_ones_start_anew(
    settings: Settings, redis_client: redis.Redis
) -> None:
    root = Root(settings)
    store = root.history_store("fence-test")
    keys = keys_for(settings)
    inc, ts = "inc-1", time.time()
    store.apply(inc, [PlayRecord(0, 0, "u9", "t1", 1.0, ts), PlayRecord(0, 1, "u8", "t1", 1.0, ts)])
    # Recorded ahead of the speed layer: the erase record is at offset 5.
    assert store.erase(inc, 0, 5, "u9", [], hold=True)
    assert redis_client.hgetall(keys.history("u9")) == {}
    store.apply(inc, [PlayRecord(0, 2, "u9", "t2", 1.0, ts), PlayRecord(0, 3, "u8", "t2", 1.0, ts)])
    assert redis_client.hgetall(keys.history("u9")) == {}  # made before the erasure: held out
    assert _history(redis_client, keys.history("u8")) == {"t1": 1.0, "t2": 1.0}
    # The speed layer reaches the record: erase again (fenced), then what follows applies.
    assert store.erase(inc, 0, 5, "u9", [], hold=False)
    store.apply(inc, [SkipRecord(0, 4), EraseRecord(0, 5, "u9"), PlayRecord(0, 6, "u9", "t3", 2.0, ts)])
    assert _history(redis_client, keys.history("u9")) == {"t3": 2.0}
    # A replay of the erasure once the fence has passed it changes nothing.
    assert not store.erase(inc, 0, 5, "u9", [], hold=False)
    assert not store.erase(inc, 0, 5, "u9", [], hold=True)
    assert _history(redis_client, keys.history("u9")) == {"t3": 2.0}
    # Another topic incarnation's erase record never blocks this one's plays.
    assert store.erase("inc-0", 0, 100, "u8", [], hold=True)
    store.apply(inc, [PlayRecord(0, 7, "u8", "t4", 1.0, ts)])
    assert _history(redis_client, keys.history("u8")) == {"t4": 1.0}
    root.close()


def test_a_forgotten_user_stays_forgotten(settings: Settings, redis_client: redis.Redis, tmp_path) -> None:
    data = SyntheticMusic(n_users=300, n_tracks=200, seed=4)
    old = publish_synthetic_model(settings, redis_client, data)
    version = publish_synthetic_model(settings, redis_client, data)  # `old` stays kept (grace period)
    keys = keys_for(settings)
    root = Root(settings)
    root.clients.ensure_topics()
    pub = PlayPublisher.connect(settings.kafka_bootstrap, settings.plays_topic)
    produce(pub, synthetic_stream(60, 40, 1, 600, live=False))  # other listeners' plays
    for t in ("t1", "t2", "brand-new-track"):
        pub.publish("u1", t, ms_played=200_000)
        pub.publish("u6", t, ms_played=200_000)
    pub.flush()
    worker = WorkerThread(settings, GROUP)
    try:
        assert wait_for(lambda: redis_client.hget(keys.history("u6"), "brand-new-track") is not None)
        assert wait_for(lambda: redis_client.zscore(keys.listeners("brand-new-track"), "u1") is not None)
    finally:
        worker.stop()  # the speed layer is down: the erasure must not wait for it
    pub.publish("u1", "t4", ms_played=200_000)  # made before the erasure, not yet applied
    pub.flush()
    u2_before = _history(redis_client, keys.history("u2"))

    app, follower = root.serving_app(follow=False)
    follower.refresh()
    with TestClient(app) as client:
        assert client.get("/recommendations/u1").json()["source"] == "personal"
        r = client.delete("/admin/users/u1")
        assert r.status_code == 200 and r.json()["erased_now"] is True and r.json()["user_id"] == "u1"
        assert redis_client.hgetall(keys.history("u1")) == {}
        assert all(redis_client.get(keys.user(v, "u1")) is None for v in (old, version))
        assert redis_client.zscore(keys.listeners("brand-new-track"), "u1") is None
        body = client.get("/recommendations/u1").json()
        assert body["source"] == "popular"
    code, out, err = encore(settings, "forget", "user", "u6")
    assert code == 0 and '"erased_now": true' in out, err
    assert redis_client.hgetall(keys.history("u6")) == {}
    pub.publish("u1", "t5", ms_played=200_000)  # after the erasure: a new history
    pub.flush()

    worker = WorkerThread(settings, GROUP)
    try:
        assert wait_for(lambda: _history(redis_client, keys.history("u1")) == {"t5": 1.0})
        assert redis_client.hgetall(keys.history("u6")) == {}
        assert _history(redis_client, keys.history("u2")) == u2_before
    finally:
        worker.stop()

    # Redis loses the speed layer's state (a restore from an empty copy): the replay from Kafka
    # re-applies every play except the erased users' earlier ones.
    fences = [keys.bucket(b).offsets(GROUP) for b in range(keys.buckets)] if keys.buckets else [keys.offsets(GROUP)]
    for key in fences + [keys.history(u) for u in ("u1", "u2", "u6")]:
        redis_client.delete(key)
    worker = WorkerThread(settings, GROUP)
    try:
        assert wait_for(lambda: _history(redis_client, keys.history("u2")) == u2_before)
        assert wait_for(lambda: _history(redis_client, keys.history("u1")) == {"t5": 1.0})
        assert redis_client.hgetall(keys.history("u6")) == {}
    finally:
        worker.stop()

    # The trainer's checkpoint and the next model hold no row for u6, and only the later play of u1.
    trainer = root.trainer()
    new = trainer.run_once()
    trainer.close()
    state = PlayMatrix.load(root.data.checkpoint)
    assert "u6" not in state.user_ids
    row = state.matrix()[state.user_ids.index("u1")]
    assert [state.track_ids[j] for j in row.indices] == ["t5"]
    artifact = read_npz(root.data.artifact(new), "artifact", "")
    assert "u6" not in {str(u) for u in artifact["user_ids"]}
    assert redis_client.get(keys.user(new, "u6")) is None
    assert np.asarray(artifact["user_factors"]).shape[0] == len(artifact["user_ids"])
    root.close()
