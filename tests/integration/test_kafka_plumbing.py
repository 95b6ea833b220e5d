"""Consumer groups, commits and restarts against a real Kafka-protocol broker."""

from __future__ import annotations

import threading
import time
from collections import Counter

import pytest
from kafka import TopicPartition

from services.infra import kafka_admin as kafka_io
from services.infra.settings import Settings

pytestmark = pytest.mark.integration


def _produce(settings: Settings, n: int) -> None:
    p = kafka_io.producer(settings.kafka_bootstrap)
    for i in range(n):
        p.send(settings.plays_topic, key=f"u{i % 97}".encode(), value=str(i).encode())
    p.flush()
    p.close()


def _drain(consumers: list, want: int, seen: Counter, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while sum(seen.values()) < want and time.monotonic() < deadline:
        for c in consumers:
            for records in c.poll(timeout_ms=200).values():
                seen.update(int(r.value) for r in records)


def test_group_of_two_sees_each_event_once(settings: Settings) -> None:
    settings = settings.with_(plays_partitions=4)
    kafka_io.ensure_topics(settings)
    kafka_io.ensure_topics(settings)  # idempotent
    group = f"g-{settings.key_prefix}"
    seen: Counter = Counter()
    lock = threading.Lock()
    stop = threading.Event()
    assignments: list[set] = [set(), set()]

    def member(i: int) -> None:
        # Each member polls continuously in its own thread, as real group members do.
        c = kafka_io.consumer(settings.kafka_bootstrap, group, settings.plays_topic)
        try:
            while not stop.is_set():
                for records in c.poll(timeout_ms=200).values():
                    with lock:
                        seen.update(int(r.value) for r in records)
                    c.commit()
                assignments[i] = {tp.partition for tp in c.assignment()}
        finally:
            c.close()

    threads = [threading.Thread(target=member, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    # Produce once the group has formed, so no rebalance hands records from one member to the other.
    formed = time.monotonic() + 60
    while time.monotonic() < formed and not (all(assignments) and len(assignments[0] | assignments[1]) == 4):
        time.sleep(0.1)
    _produce(settings, 10_000)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and (sum(seen.values()) < 10_000 or not all(assignments)):
        time.sleep(0.2)
    stop.set()
    for t in threads:
        t.join(timeout=30)
    assert set(seen) == set(range(10_000))
    assert max(seen.values()) == 1
    assert all(assignments) and not (assignments[0] & assignments[1])


def test_commit_stop_restart_reads_the_rest_once(settings: Settings) -> None:
    kafka_io.ensure_topics(settings)
    _produce(settings, 2_000)
    group = f"r-{settings.key_prefix}"
    c = kafka_io.consumer(settings.kafka_bootstrap, group, settings.plays_topic)
    first: Counter = Counter()
    deadline = time.monotonic() + 60
    while sum(first.values()) < 800 and time.monotonic() < deadline:
        for records in c.poll(timeout_ms=200, max_records=100).values():
            first.update(int(r.value) for r in records)
    c.commit()
    c.close()
    c2 = kafka_io.consumer(settings.kafka_bootstrap, group, settings.plays_topic)
    rest: Counter = Counter()
    _drain([c2], 2_000 - sum(first.values()), rest)
    c2.close()
    assert not (set(first) & set(rest))
    assert set(first) | set(rest) == set(range(2_000))


def test_incarnation_changes_when_topic_is_recreated(settings: Settings) -> None:
    kafka_io.ensure_topics(settings)
    one = kafka_io.topic_incarnation(settings.kafka_bootstrap, settings.plays_topic)
    client = kafka_io.admin(settings.kafka_bootstrap)
    client.delete_topics([settings.plays_topic])
    client.close()
    time.sleep(0.5)
    kafka_io.ensure_topics(settings)
    two = kafka_io.topic_incarnation(settings.kafka_bootstrap, settings.plays_topic)
    assert one != two
    assert one.split("/")[0] == two.split("/")[0]
    c = kafka_io.consumer(settings.kafka_bootstrap, None)
    assert c.partitions_for_topic(settings.plays_topic) == {0, 1, 2, 3}
    assert c.end_offsets([TopicPartition(settings.plays_topic, 0)])
    c.close()
