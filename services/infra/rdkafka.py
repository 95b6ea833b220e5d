"""librdkafka clients (confluent-kafka) for the hot paths: fold-in and the serving follower.

kafka-python decodes records and checks CRCs in pure Python, and its `send` costs tens of
microseconds per record; at tens of thousands of plays per second that is most of a core.
The fold-in worker therefore consumes and produces through librdkafka. Admin calls and the
low-rate producers elsewhere stay on kafka-python.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Collection
from typing import Any

import numpy as np
from confluent_kafka import (
    OFFSET_BEGINNING,
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    Producer,
    TopicPartition,
)

from core.messages import DeadLetter, Entity, FactorUpdate

log = logging.getLogger(__name__)

ProduceFailed = KafkaException
# Readers (a serving replica follows `factor-updates` and `tracks` with two of them per worker)
# sit idle most of the time, asking the broker again each time a fetch's wait ends. Apache Kafka
# answers a waiting fetch as soon as a record arrives (fetch.min.bytes 1), so a longer wait costs
# it no latency; the embedded broker (tansu 0.6) does not, so there the wait is a trade. Measured
# there, produce → consume p50 and the broker's CPU per idle reader: 10 ms wait 3.9 ms and 0.052
# cores; 100 ms wait 16 ms and 0.014 cores; 500 ms wait 115 ms and 0.004 cores. The group
# consumers of the speed layer keep 10 ms: their freshness target is 150 ms end to end.
READER_FETCH_WAIT_MS = 100


def consumer(bootstrap: str, group: str, **overrides: Any) -> Consumer:
    """Group consumer: manual commits, earliest reset, and a group that forms in seconds."""
    cfg: dict[str, Any] = {
        "bootstrap.servers": bootstrap,
        "group.id": group,
        "enable.auto.commit": False,
        "enable.auto.offset.store": False,
        "auto.offset.reset": "earliest",
        "session.timeout.ms": 6000,
        "heartbeat.interval.ms": 1000,
        "max.poll.interval.ms": 300_000,
        "fetch.wait.max.ms": 10,
        "queued.min.messages": 100_000,
        "logger": log,
    }
    cfg.update(overrides)
    return Consumer(cfg)


def reader(bootstrap: str, topic: str, fetch_wait_ms: int = READER_FETCH_WAIT_MS, **security: Any) -> Consumer:
    """A group-less consumer assigned every partition of `topic` from the beginning."""
    c = consumer(
        bootstrap, f"encore-reader-{uuid.uuid4().hex[:12]}", **{"fetch.wait.max.ms": fetch_wait_ms}, **security
    )
    parts = c.list_topics(topic, timeout=15).topics[topic].partitions or {0: None}
    c.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in parts])
    return c


def data_messages(messages: list[Message]) -> list[Message]:
    """Drop error events (partition EOF, transport hiccups librdkafka retries by itself)."""
    out = []
    for m in messages:
        err = m.error()
        if err is None:
            out.append(m)
        elif err.code() != KafkaError._PARTITION_EOF:
            log.warning("consumer: %s", err)
    return out


class UpdatePublisher:
    """Producer whose `flush` raises unless every record sent since the last flush is acknowledged.
    Failures are kept per topic, so two threads sharing the producer, each flushing its own
    topics, each learn of their own failures (never one thread's failure taken by the other).

    `send(topic, value, key, headers)` matches kafka-python's signature, so fold-in code can be
    handed either producer.
    """

    def __init__(self, bootstrap: str, **overrides: Any) -> None:
        cfg: dict[str, Any] = {
            "bootstrap.servers": bootstrap,
            "acks": "all",
            "linger.ms": 10,
            "batch.num.messages": 10_000,
            "queue.buffering.max.messages": 1_000_000,
            "message.timeout.ms": 30_000,
            "delivery.report.only.error": True,  # `_delivered` runs for failures only
            "partitioner": "murmur2_random",  # the same partition for a key as Java clients
            "logger": log,
        }
        cfg.update(overrides)
        self.producer = Producer(cfg)
        self.errors: dict[str, list[str]] = {}

    def _delivered(self, err: KafkaError | None, msg: Message) -> None:
        if err is not None:
            self.errors.setdefault(msg.topic() or "", []).append(f"{msg.topic()}: {err.str()}")

    def send(
        self,
        topic: str,
        value: bytes | None = None,
        key: bytes | None = None,
        headers: list[tuple[str, bytes]] | None = None,
    ) -> None:
        while True:
            try:
                self.producer.produce(topic, value=value, key=key, headers=headers, on_delivery=self._delivered)
                return
            except BufferError:  # local queue full: let deliveries drain
                self.producer.poll(0.05)

    def flush(self, timeout: float = 30.0, topics: Collection[str] | None = None) -> None:
        """Wait for every record sent; raise if one is undelivered or one of `topics` (default:
        all) had a failure since their last flush."""
        left = self.producer.flush(timeout)
        errors: list[str] = []
        for topic in list(self.errors) if topics is None else topics:
            errors += self.errors.pop(topic, [])
        if left or errors:
            raise ProduceFailed(f"{left} record(s) undelivered, {len(errors)} failed: {errors[:3]}")

    def close(self) -> None:
        self.producer.flush(10.0)


class KafkaUpdateSink:
    """The speed layer's update sink on Kafka: vectors to `factor-updates`, rejects to the DLQ
    (each with the plays topic's `incarnation` header, set by the worker)."""

    def __init__(self, publisher: UpdatePublisher, updates_topic: str, dlq_topic: str) -> None:
        self.publisher, self.updates_topic, self.dlq_topic = publisher, updates_topic, dlq_topic
        self.incarnation = ""

    def update(self, u: FactorUpdate) -> None:
        self.publisher.send(self.updates_topic, key=u.key(), value=u.value())

    def updates(self, entity: Entity, model_version: str, ids: list[str], vectors: np.ndarray) -> None:
        send, topic = self.publisher.send, self.updates_topic
        for key, value in FactorUpdate.encode_many(entity, model_version, ids, vectors):
            send(topic, key=key, value=value)

    def dead_letter(self, d: DeadLetter) -> None:
        headers = [*d.headers(), ("incarnation", self.incarnation.encode())]
        self.publisher.send(self.dlq_topic, value=d.raw, headers=headers)

    def flush(self, updates: bool = True, letters: bool = True) -> None:
        topics = [t for t, on in ((self.updates_topic, updates), (self.dlq_topic, letters)) if on]
        self.publisher.flush(topics=topics)

    def close(self) -> None:
        self.publisher.close()


def commit(c: Consumer, topic: str, last: dict[int, int], asynchronous: bool = False) -> None:
    """Commit `last offset + 1` per partition (asynchronously: sent in order, not waited for)."""
    if last:
        c.commit(offsets=[TopicPartition(topic, p, o + 1) for p, o in last.items()], asynchronous=asynchronous)


def produced_letters(
    bootstrap: str, dlq_topic: str, incarnation: str, tail: int = 100_000, **security: Any
) -> dict[int, int]:
    """Per plays partition, the highest source offset among this incarnation's dead letters in
    the last `tail` records of the dead-letter topic: letters up to it are already produced.

    The owner of a partition produces its letters in offset order and flushes before it settles
    them, so this high-water mark tells a worker replaying lost Redis state which letters not to
    send again.
    """
    c = consumer(bootstrap, f"encore-dlq-scan-{uuid.uuid4().hex[:12]}", **{"enable.partition.eof": True}, **security)
    try:
        meta = c.list_topics(dlq_topic, timeout=15).topics.get(dlq_topic)
        start = []
        for p in meta.partitions if meta is not None and meta.partitions else []:
            low, high = c.get_watermark_offsets(TopicPartition(dlq_topic, p), timeout=10)
            if high > low:
                start.append(TopicPartition(dlq_topic, p, max(low, high - tail)))
        c.assign(start)
        done: dict[int, int] = {}
        left, idle = {tp.partition for tp in start}, 0
        while left and idle < 20:
            batch = c.consume(num_messages=10_000, timeout=0.5)
            idle = 0 if batch else idle + 1
            for m in batch:
                err = m.error()
                if err is not None:
                    if err.code() == KafkaError._PARTITION_EOF:
                        left.discard(m.partition() or 0)
                    continue
                h = {k: v for k, v in m.headers() or []}
                if (h.get("incarnation") or b"").decode() != incarnation:
                    continue
                src = (h.get("source") or b"").decode().split("/")
                if len(src) >= 3 and src[-1].isdigit() and src[-2].isdigit():
                    p, o = int(src[-2]), int(src[-1])
                    done[p] = max(done.get(p, -1), o)
        return done
    finally:
        c.close()
