"""Session fixtures: a real Kafka-protocol broker and a real Redis.

Order: ENCORE_TEST_KAFKA_BOOTSTRAP / ENCORE_TEST_REDIS_URL when set; else testcontainers when
a Docker engine answers; else embedded child processes (tansu, redis-server).
"""

from __future__ import annotations

import os
import subprocess
import uuid
from collections.abc import Iterator
from contextlib import ExitStack

import pytest

from services.infra.embedded import EmbeddedServers
from services.infra.settings import Settings


def _docker_answers() -> bool:
    try:
        return subprocess.run(["docker", "info"], capture_output=True, timeout=5).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.fixture(scope="session")
def servers() -> Iterator[dict[str, object]]:
    """{'kafka': bootstrap, 'redis': url, 'embedded': EmbeddedServers | None}."""
    kafka = os.environ.get("ENCORE_TEST_KAFKA_BOOTSTRAP", "")
    redis = os.environ.get("ENCORE_TEST_REDIS_URL", "")
    with ExitStack() as stack:
        embedded = None
        if (not kafka or not redis) and _docker_answers():
            if not kafka:
                from testcontainers.kafka import KafkaContainer

                kc = stack.enter_context(KafkaContainer().with_kraft())
                kafka = kc.get_bootstrap_server()
            if not redis:
                from testcontainers.redis import RedisContainer

                rc = stack.enter_context(RedisContainer())
                redis = f"redis://{rc.get_container_host_ip()}:{rc.get_exposed_port(6379)}/0"
        if not kafka or not redis:
            embedded = EmbeddedServers.start(kafka=not kafka, redis=not redis)
            stack.callback(embedded.stop)
            kafka = kafka or embedded.kafka_bootstrap
            redis = redis or embedded.redis_url
        yield {"kafka": kafka, "redis": redis, "embedded": embedded}


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Tests marked `both_topologies` run once on one Redis and once on a Redis Cluster."""
    if metafunc.definition.get_closest_marker("both_topologies") and "topology" in metafunc.fixturenames:
        metafunc.parametrize("topology", ["redis", "cluster"], indirect=True)


@pytest.fixture
def topology(request: pytest.FixtureRequest) -> str:
    return str(getattr(request, "param", "redis"))


@pytest.fixture
def settings(servers: dict[str, object], tmp_path: object, topology: str, request: pytest.FixtureRequest) -> Settings:
    """Settings with this test's own topics and key prefix (on a Redis Cluster for the
    `cluster` leg of a `both_topologies` test)."""
    tag = uuid.uuid4().hex[:10]
    cluster = topology == "cluster"
    return Settings(
        kafka_bootstrap=str(servers["kafka"]),
        redis_url=request.getfixturevalue("redis_cluster_url") if cluster else str(servers["redis"]),
        redis_buckets=16,
        plays_topic=f"plays-{tag}",
        dlq_topic=f"plays-{tag}.dlq",
        updates_topic=f"factor-updates-{tag}",
        tracks_topic=f"tracks-{tag}",
        tracks_dlq_topic=f"tracks-{tag}.dlq",
        impressions_topic=f"impressions-{tag}",
        key_prefix=f"test-{tag}:",
        data_dir=str(tmp_path),
        factors=16,
        iterations=8,
        tune=False,  # hyperparameters pinned: tests other than the tuning ones compare fixed models
    )


@pytest.fixture
def redis_client(settings: Settings) -> Iterator[object]:
    """A client of the test's Redis (a cluster client on the cluster leg)."""
    from services.infra.clients import Clients

    client = Clients(settings).redis()
    yield client
    client.close()


@pytest.fixture(scope="session")
def redis_cluster_url() -> Iterator[str]:
    """A real Redis Cluster: ENCORE_TEST_REDIS_CLUSTER_URL, else 3 masters + 3 replicas as
    child processes (kept for the session; tests that kill nodes start their own)."""
    url = os.environ.get("ENCORE_TEST_REDIS_CLUSTER_URL", "")
    if url:
        yield url
        return
    from services.infra.embedded_cluster import EmbeddedRedisCluster

    cluster = EmbeddedRedisCluster.start(masters=3, replicas=1)
    try:
        yield cluster.url
    finally:
        cluster.stop()
