"""The one place Redis and Kafka clients are made, all with one timeout and retry policy.

Every command and component gets its clients from `Clients(settings)`; nothing connects at
import time. Redis: `ENCORE_REDIS_TIMEOUT_S` for connects and every command, one quick retry
of a dropped connection (writes are fenced or idempotent, so a repeat is safe), health checks on
idle connections. Redis Cluster (`ENCORE_REDIS_CLUSTER`, auto-detected by default) gets
redis-py's cluster clients with the same timeouts, and keys bucketed by hash tag (`Keys`).
Kafka: request timeouts of 15 s, acks=all, manual commits.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import redis
import redis.asyncio as aioredis
from confluent_kafka import Consumer
from kafka import KafkaConsumer, KafkaProducer
from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster
from redis.backoff import ExponentialBackoff
from redis.cluster import RedisCluster
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry

from services.infra import kafka_admin, rdkafka
from services.infra.cluster_io import fixed_bucket_count, is_cluster
from services.infra.kafka_security import kafka_python_config, rdkafka_config
from services.infra.keys import Keys
from services.infra.lean_redis import LeanRedis
from services.infra.settings import ConfigError, Settings

REDIS_RETRIES = 1


def redis_options(timeout_s: float) -> dict[str, Any]:
    """Connection options shared by the sync and asyncio clients."""
    return {
        "socket_timeout": timeout_s,
        "socket_connect_timeout": timeout_s,
        "health_check_interval": 10,
        "retry_on_error": [RedisConnectionError, RedisTimeoutError],
    }


def cluster_options(timeout_s: float) -> dict[str, Any]:
    """Redis Cluster clients: the same timeouts; redirects and failovers are retried by the
    cluster client itself (it re-learns the slots), and Encore's steps on top of that."""
    return {"socket_timeout": timeout_s, "socket_connect_timeout": timeout_s}


def redis_security(s: Settings) -> dict[str, Any]:
    """Credentials and TLS options for every Redis client (one place, so no client is left in
    plain text or without its password). The password file is read when a client is made."""
    out: dict[str, Any] = {}
    if s.redis_username:
        out["username"] = s.redis_username
    password = s.redis_password
    if s.redis_password_file:
        try:
            password = Path(s.redis_password_file).read_text().splitlines()[0].strip()
        except (OSError, IndexError) as exc:
            raise ConfigError(
                f"ENCORE_REDIS_PASSWORD_FILE={s.redis_password_file}: cannot read a password ({exc})"
            ) from None
    if password:
        out["password"] = password
    if s.redis_url.startswith("rediss://"):
        out["ssl_cert_reqs"] = "required"
        for name, path in (
            ("ssl_ca_certs", s.redis_ca_file),
            ("ssl_certfile", s.redis_cert_file),
            ("ssl_keyfile", s.redis_key_file),
        ):
            if path:
                if not Path(path).is_file():
                    raise ConfigError(f"{name.replace('ssl_', 'Redis TLS ')} file {path} does not exist")
                out[name] = path
    elif s.redis_ca_file or s.redis_cert_file:
        raise ConfigError("ENCORE_REDIS_CA_FILE / _CERT_FILE need a rediss:// URL (TLS); the URL is redis://")
    return out


@dataclass(frozen=True)
class Clients:
    """Factory of every client, configured from one Settings."""

    settings: Settings
    patience_s: float = 0.0  # how long to wait for Redis to answer whether it is a cluster

    @functools.cached_property
    def cluster(self) -> bool:
        """Whether Redis is a Redis Cluster (ENCORE_REDIS_CLUSTER, or asked of the server; a
        failure to ask is raised, not cached)."""
        s = self.settings
        return bool(s.redis_url) and is_cluster(
            s.redis_url, s.redis_cluster, s.redis_timeout_s, self.patience_s, **redis_security(s)
        )

    @functools.cached_property
    def keys(self) -> Keys:
        """The key schema; on a cluster with the bucket count the state was written with."""
        s = self.settings
        if not self.cluster:
            return Keys(s.key_prefix)
        rc = self.redis()
        try:
            return Keys(s.key_prefix, fixed_bucket_count(rc, Keys(s.key_prefix).bucket_count, s.redis_buckets))
        finally:
            rc.close()

    def redis(self) -> redis.Redis:
        """One Redis, or a `RedisCluster` (same single-key command API; multi-key writes go
        through cluster_io's per-node pipelines, the nodes at once, where it matters)."""
        s = self.settings
        if self.cluster:
            options = cluster_options(s.redis_timeout_s) | redis_security(s)
            return cast(redis.Redis, RedisCluster.from_url(s.redis_url, **options))
        retry = Retry(ExponentialBackoff(cap=0.5, base=0.05), REDIS_RETRIES)
        return redis.Redis.from_url(s.redis_url, retry=retry, **redis_options(s.redis_timeout_s), **redis_security(s))

    def aio_redis(self) -> aioredis.Redis:
        """An asyncio client; bound to the event loop it is first used on."""
        from redis.asyncio.retry import Retry as AsyncRetry

        s = self.settings
        if self.cluster:
            options = cluster_options(s.redis_timeout_s) | redis_security(s)
            return cast(aioredis.Redis, AsyncRedisCluster.from_url(s.redis_url, **options))
        retry = AsyncRetry(ExponentialBackoff(cap=0.5, base=0.05), REDIS_RETRIES)
        return aioredis.Redis.from_url(
            s.redis_url, retry=retry, **redis_options(s.redis_timeout_s), **redis_security(s)
        )

    def lean_redis(self) -> LeanRedis | None:
        """The serving hot path's pipelined client (`lean_redis`); None on a cluster, where the
        cluster client routes each key to its node."""
        s = self.settings
        if self.cluster:
            return None
        return LeanRedis(s.redis_url, timeout_s=s.redis_timeout_s, **redis_security(s))

    @functools.cached_property
    def rdkafka_security(self) -> dict[str, Any]:
        """ENCORE_KAFKA_* security as librdkafka properties (checked once)."""
        return rdkafka_config(self.settings)

    @functools.cached_property
    def kafka_python_security(self) -> dict[str, Any]:
        """The same security as kafka-python arguments."""
        return kafka_python_config(self.settings)

    def dead_letters_produced(self, incarnation: str) -> dict[int, int]:
        s = self.settings
        return rdkafka.produced_letters(s.kafka_bootstrap, s.dlq_topic, incarnation, **self.rdkafka_security)

    def ensure_topics(self) -> None:
        kafka_admin.ensure_topics(self.settings)

    def topic_incarnation(self, topic: str) -> str:
        return kafka_admin.topic_incarnation(self.settings.kafka_bootstrap, topic, **self.kafka_python_security)

    def group_consumer(self, group: str, fetch_wait_ms: int | None = None) -> Consumer:
        """librdkafka group consumer (hot path), auto-commit off; `fetch_wait_ms` for one whose
        latency does not matter (see `rdkafka.READER_FETCH_WAIT_MS`)."""
        wait = {} if fetch_wait_ms is None else {"fetch.wait.max.ms": fetch_wait_ms}
        return rdkafka.consumer(self.settings.kafka_bootstrap, group, **wait, **self.rdkafka_security)

    def topic_reader(self, topic: str) -> Consumer:
        """librdkafka consumer of every partition of `topic`, from the beginning, no group."""
        return rdkafka.reader(self.settings.kafka_bootstrap, topic, **self.rdkafka_security)

    def update_publisher(self, **overrides: Any) -> rdkafka.UpdatePublisher:
        """librdkafka producer whose flush raises unless every record was acknowledged;
        `overrides` are librdkafka settings (e.g. `**{"linger.ms": 100}`)."""
        return rdkafka.UpdatePublisher(self.settings.kafka_bootstrap, **self.rdkafka_security, **overrides)

    def assigned_consumer(self, group: str | None) -> KafkaConsumer:
        """kafka-python consumer for manual assignment (the trainer seeks to its checkpoint)."""
        return kafka_admin.consumer(self.settings.kafka_bootstrap, group, **self.kafka_python_security)

    def producer(self) -> KafkaProducer:
        """kafka-python producer for low-rate writers (plays from files and demos)."""
        return kafka_admin.producer(self.settings.kafka_bootstrap, **self.kafka_python_security)
