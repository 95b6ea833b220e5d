"""Kafka plumbing on kafka-python: idempotent topic creation, incarnation ids, and the
low-rate producer and assigned consumer (the hot path is on librdkafka, `rdkafka.py`)."""

from __future__ import annotations

import logging
import time
from typing import Any

from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer
from kafka.admin import NewTopic
from kafka.errors import KafkaError, TopicAlreadyExistsError

from core.errors import EncoreError
from services.infra.kafka_security import kafka_python_config
from services.infra.settings import Settings

log = logging.getLogger(__name__)

# A consumer group forms in ~3 s with these instead of ~23 s with the defaults.
GROUP_SETTINGS: dict[str, Any] = {
    "session_timeout_ms": 6000,
    "heartbeat_interval_ms": 1000,
    "max_poll_interval_ms": 300_000,
    "enable_auto_commit": False,
    "auto_offset_reset": "earliest",
    "request_timeout_ms": 30_000,
}


def admin(bootstrap: str, **security: Any) -> KafkaAdminClient:
    return KafkaAdminClient(
        bootstrap_servers=bootstrap, client_id="encore-admin", request_timeout_ms=15_000, **security
    )


def ensure_topics(settings: Settings, retries: int = 30) -> None:
    """Create plays (several partitions), the DLQs, factor-updates and the compacted catalogue;
    existing topics are kept."""
    wanted = {
        settings.plays_topic: settings.plays_partitions,
        settings.dlq_topic: 1,
        settings.updates_topic: 1,
        settings.tracks_topic: 1,
        settings.tracks_dlq_topic: 1,
        settings.impressions_topic: settings.plays_partitions,
    }
    compacted = {settings.tracks_topic}
    ensure_topic_partitions(settings.kafka_bootstrap, wanted, retries, compacted, **kafka_python_config(settings))


def ensure_topic_partitions(
    bootstrap: str, wanted: dict[str, int], retries: int = 30, compacted: set[str] | None = None, **security: Any
) -> None:
    for attempt in range(retries):
        try:
            client = admin(bootstrap, **security)
            try:
                existing = set(client.list_topics())
                new = [
                    NewTopic(t, n, 1, topic_configs={"cleanup.policy": "compact"} if t in (compacted or ()) else {})
                    for t, n in wanted.items()
                    if t not in existing
                ]
                if new:
                    try:
                        client.create_topics(new)
                    except TopicAlreadyExistsError:
                        pass
                    log.info("created topics %s", [t.name for t in new])
                return
            finally:
                client.close()
        except KafkaError as exc:
            log.warning("topic creation failed (%s), retry %d", exc, attempt + 1)
            time.sleep(min(2.0, 0.2 * (attempt + 1)))
    raise EncoreError(f"could not create topics on {bootstrap}: is the broker reachable?")


def topic_incarnation(bootstrap: str, topic: str, **security: Any) -> str:
    """`cluster_id/topic_id`: changes when the broker restarts empty or the topic is re-created."""
    client = admin(bootstrap, **security)
    try:
        cluster = client.describe_cluster().get("cluster_id") or "unknown-cluster"
        desc = client.describe_topics([topic])[0]
        topic_id = desc.get("topic_id") or "no-topic-id"
        return f"{cluster}/{topic_id}"
    finally:
        client.close()


def producer(bootstrap: str, **overrides: Any) -> KafkaProducer:
    """A durable producer: acks=all, retries, small batching delay, ordered per key."""
    cfg: dict[str, Any] = {
        "bootstrap_servers": bootstrap,
        "acks": "all",
        "retries": 10,
        "linger_ms": 5,
        "batch_size": 64 * 1024,
        "max_in_flight_requests_per_connection": 1,
        "request_timeout_ms": 15_000,
    }
    cfg.update(overrides)
    return KafkaProducer(**cfg)


def consumer(bootstrap: str, group: str | None, *topics: str, **overrides: Any) -> KafkaConsumer:
    """A consumer with auto-commit off; joins `group` (subscribed to `topics`) when given."""
    cfg: dict[str, Any] = {"bootstrap_servers": bootstrap, "group_id": group, **GROUP_SETTINGS}
    cfg.update(overrides)
    c = KafkaConsumer(**cfg)
    if topics:
        c.subscribe(list(topics))
    return c
