"""Encore on a real Redis Cluster (3 masters, 3 replicas): the same behaviour as on one Redis.

Fold-in histories exact with dead letters, training and the model list through the command
line, the HTTP API and the lookup client, `encore status`, and exactly once across a master
killed mid-stream (its replica takes over, possibly without the last writes it acknowledged).
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from typing import cast

import pytest
import redis
from fastapi.testclient import TestClient

from core.synthetic import SyntheticMusic
from services.cli.produce import produce, synthetic_stream
from services.cli.root import Root
from services.client import EncoreClient
from services.infra.embedded_cluster import EmbeddedRedisCluster
from services.infra.settings import Settings
from services.produce import PlayPublisher
from tests.integration.helpers import WorkerThread, encore, publish_synthetic_model, wait_for

pytestmark = pytest.mark.integration
BUCKETS = 32


@pytest.fixture
def on_cluster(settings: Settings, redis_cluster_url: str) -> Iterator[tuple[Settings, redis.RedisCluster]]:
    s = settings.with_(redis_url=redis_cluster_url, redis_buckets=BUCKETS)
    rc = redis.RedisCluster.from_url(redis_cluster_url)
    yield s, rc
    rc.close()


def _histories(root: Root, users: list[str]) -> dict[str, dict[str, float]]:
    flat = root.history_store().raw_histories(users)
    return {u: {f[i].decode(): float(f[i + 1]) for i in range(0, len(f), 2)} for u, f in zip(users, flat, strict=True)}


def _publish(pub: PlayPublisher, plays: list[tuple[str, str]], expected: dict[str, Counter[str]]) -> None:
    for u, t in plays:
        pub.publish(u, t, ms_played=200_000)
        expected.setdefault(u, Counter())[t] += 1
    pub.flush()


def _caught_up(root: Root, s: Settings, expected: dict[str, Counter[str]]) -> bool:
    try:
        got = _histories(root, sorted(expected))
    except redis.RedisError:  # a failover in progress: a reader retries, as the worker does
        return False
    return got == {u: {t: float(n) for t, n in c.items()} for u, c in expected.items()}


def test_foldin_status_and_dead_letters_on_a_cluster(on_cluster: tuple[Settings, redis.RedisCluster]) -> None:
    s, rc = on_cluster
    version = publish_synthetic_model(s, rc, SyntheticMusic(n_users=200, n_tracks=150, seed=4))
    worker = WorkerThread(s, "encore-foldin")
    root = Root(s)
    try:
        assert root.keys.buckets == BUCKETS and "{" in root.keys.history("u1")
        pub = PlayPublisher.connect(s.kafka_bootstrap, s.plays_topic)
        expected: dict[str, Counter[str]] = {}
        _publish(pub, [(f"u{i % 97}", f"t{(i * 7) % 150}") for i in range(1500)], expected)
        pub.publish_raw(b"x", b"{not json")
        pub.flush()
        assert wait_for(lambda: _caught_up(root, s, expected))
        users = sorted(expected)
        assert all(v is not None for v in root.models().user_vectors(version, users))
        code, out, err = encore(s, "status", "--json")
        report = json.loads(out)
        parts = report["groups"]["encore-foldin"]["partitions"]
        assert sum(p["lag"] for p in parts.values()) == 0, err
        assert wait_for(lambda: json.loads(encore(s, "status", "--json")[1])["dead_letters"]["in_topic"] == 1)
    finally:
        worker.stop()
        root.close()


def test_train_serve_and_lookup_client_on_a_cluster(on_cluster: tuple[Settings, redis.RedisCluster]) -> None:
    s, rc = on_cluster
    Root(s).clients.ensure_topics()
    pub = PlayPublisher.connect(s.kafka_bootstrap, s.plays_topic)
    produce(pub, synthetic_stream(300, 200, 5, None, live=False))
    pub.close()
    code, out, err = encore(s, "train", "--once")
    assert code == 0, err
    code, out, err = encore(s, "model", "list")
    listed = [json.loads(line) for line in out.splitlines()]
    assert code == 0 and [v["current"] and v["in_redis"] for v in listed] == [True], err
    assert listed[0]["hyperparameters"]["factors"] == s.factors and 0 < listed[0]["coverage@10"] <= 1
    root = Root(s)
    version = root.models().current_version()
    assert version == listed[0]["version"]
    rc.hset(root.keys.history("u5"), mapping={"t1": 3.0, "t2": 1.0})
    app, follower = root.serving_app(follow=False)
    follower.refresh()
    try:
        with TestClient(app) as client:
            body = client.get("/recommendations/u5?n=10").json()
            assert body["model_version"] == version and body["source"] == "personal"
            assert len(body["items"]) == 10 and not {"t1", "t2"} & {i["track_id"] for i in body["items"]}
            assert len(client.get("/similar/t3?n=5").json()["items"]) == 5
            assert client.get("/ready").status_code == 200
        c = EncoreClient(s.redis_url, s.key_prefix)
        assert c.current_version() == version and c.history("u5") == {"t1": 3.0, "t2": 1.0}
        top = c.top_n("u5", 10)
        assert len(top) == 10 and not {"t1", "t2"} & {t for t, _ in top}
        c.close()
    finally:
        root.close()


def test_the_bucket_count_is_fixed_once_state_is_written(on_cluster: tuple[Settings, redis.RedisCluster]) -> None:
    """A reader or writer configured with another count uses the layout the state has."""
    s, rc = on_cluster
    assert Root(s.with_(redis_buckets=64)).keys.buckets == 64
    assert Root(s.with_(redis_buckets=128)).keys.buckets == 64
    assert EncoreClient(s.redis_url, s.key_prefix).keys.buckets == 64


def _exact_through(settings: Settings, fault: Callable[[EmbeddedRedisCluster, int], None], replicas: int = 1) -> None:
    """Stream plays into a fold-in worker on a fresh cluster (3 masters), inject `fault` (given
    the cluster and the master holding most buckets) a second in, and check every history exact."""
    cluster = EmbeddedRedisCluster.start(masters=3, replicas=replicas)
    s = settings.with_(redis_url=cluster.url, redis_buckets=BUCKETS)
    worker = WorkerThread(s, "encore-foldin")
    root = Root(s)
    try:
        publish_synthetic_model(s, root.redis, SyntheticMusic(n_users=200, n_tracks=150, seed=7))
        pub = PlayPublisher.connect(s.kafka_bootstrap, s.plays_topic)
        expected: dict[str, Counter[str]] = {}

        def stream() -> None:
            for k in range(60):
                _publish(pub, [(f"u{(k * 31 + i) % 150}", f"t{(k + i * 3) % 150}") for i in range(100)], expected)
                time.sleep(0.05)

        producer = threading.Thread(target=stream)
        producer.start()
        time.sleep(1.0)
        rc = cast(redis.RedisCluster, root.redis)
        owners = Counter(rc.get_node_from_key(root.keys.bucket(b).pending_users).port for b in range(BUCKETS))
        fault(cluster, owners.most_common(1)[0][0])
        producer.join()
        cluster.wait_healthy()
        assert wait_for(lambda: _caught_up(root, s, expected), timeout=120)
        time.sleep(2.0)  # nothing more arrives, nothing is counted twice later
        assert _caught_up(root, s, expected)
        assert worker.thread.is_alive()
    finally:
        worker.stop()
        root.close()
        cluster.stop()


def test_exactly_once_across_a_master_killed_mid_stream(settings: Settings) -> None:
    """SIGKILL of the master holding most buckets while plays stream in: its replica takes
    over (maybe without the last writes the master acknowledged); the fences see what was
    lost, the worker replays it from Kafka, and every history ends exact."""
    _exact_through(settings, lambda cluster, port: cluster.kill(port))


def test_exactly_once_across_a_reshard_mid_stream(settings: Settings) -> None:
    """3,000 slots with their keys move live from the busiest master to another while plays
    stream in (ASK, MOVED and TRYAGAIN meanwhile): retried, nothing committed twice or lost."""

    def reshard(cluster: EmbeddedRedisCluster, port: int) -> None:
        other = next(p for p in cluster.master_ports() if p != port)
        cluster.reshard(port, other, 3000)

    _exact_through(settings, reshard)


def test_exactly_once_through_clusterdown(settings: Settings) -> None:
    """A master without a replica killed: its slots are uncovered and every node answers
    CLUSTERDOWN until it is back (on its append-only file, maybe without its last second).
    The worker backs off with nothing committed and, once the cluster heals, replays what the
    master lost: every history exact."""

    def down_and_back(cluster: EmbeddedRedisCluster, port: int) -> None:
        cluster.kill(port)
        live = next(p for p in cluster.live_ports())
        assert wait_for(lambda: cluster.info(live).get("cluster_state") == "fail", timeout=30)
        time.sleep(1.0)  # plays keep streaming while the cluster is down
        cluster.restart(port)

    _exact_through(settings, down_and_back, replicas=0)


def test_exactly_once_through_unassigned_slots(settings: Settings, caplog: pytest.LogCaptureFixture) -> None:
    """The busiest master's slots taken out of the cluster's map mid-stream (unassigned slots:
    CLUSTERDOWN everywhere), then given back: the worker says why it waits and that nothing
    was committed, backs off, and ends with every history exact."""

    def unassigned_and_back(cluster: EmbeddedRedisCluster, port: int) -> None:
        ranges = cluster.unassign(port)
        live = next(p for p in cluster.live_ports())
        assert wait_for(lambda: cluster.info(live).get("cluster_state") == "fail", timeout=30)
        time.sleep(2.0)  # plays keep streaming while slots are unassigned
        cluster.assign(port, ranges)

    with caplog.at_level("WARNING"):
        _exact_through(settings, unassigned_and_back)
    waits = [r.getMessage() for r in caplog.records if "nothing committed" in r.getMessage()]
    assert any("ClusterDown" in m or "CLUSTERDOWN" in m or "not covered" in m for m in waits), waits[:5]
