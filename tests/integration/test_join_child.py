"""The experiment join in its own process beside `encore foldin`, on real servers: it is started
again when it dies, counts exactly once across that, exports its gauges in the parent, and stops
when asked."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections import Counter

import pytest
import redis
from kafka import KafkaProducer

from services.infra import kafka_admin, metrics
from services.infra.experiment_metrics import arm_metrics
from services.infra.settings import Settings
from services.produce import PlayPublisher
from services.speed.join_child import JoinChild
from tests.e2e.test_foldin_kill import _env
from tests.integration.helpers import keys_for, wait_for

pytestmark = [pytest.mark.integration]


def _round(settings: Settings, tag: str, n: int) -> Counter[str]:
    """`n` impressions in arms a and b, then a play of a shown track by every second user: the
    counts the join must reach."""
    imp = KafkaProducer(bootstrap_servers=settings.kafka_bootstrap, linger_ms=5)
    plays = PlayPublisher.connect(settings.kafka_bootstrap, settings.plays_topic)
    expected: Counter[str] = Counter()
    now = time.time()
    for i in range(n):
        user, arm, items = f"{tag}u{i}", ("a", "b")[i % 2], [f"t{i}", f"t{i + 1}"]
        record = {"v": 1, "request_id": f"{tag}-{i}", "user_id": user, "experiment": "x", "arm": arm}
        record |= {"model_version": "v", "items": items, "ts": now}
        imp.send(settings.impressions_topic, key=user.encode(), value=json.dumps(record).encode())
        expected[f"{arm}|impressions"] += 1
    imp.flush()
    for i in range(0, n, 2):
        plays.publish(f"{tag}u{i}", f"t{i}", ts=now + 1)
        expected["a|plays"] += 1
        expected["a|converted"] += 1
    plays.flush()
    imp.close()
    plays.close()
    return expected


def test_the_join_child_restarts_after_a_kill9_and_counts_exactly_once(
    settings: Settings, redis_client: redis.Redis
) -> None:
    kafka_admin.ensure_topics(settings)
    keys = keys_for(settings)
    child = JoinChild(redis_client, keys, _env(settings))
    runner = threading.Thread(target=child.run, daemon=True)
    runner.start()

    def totals() -> Counter[str]:
        got = arm_metrics(redis_client, keys).get("x", {})
        return Counter(
            {f"{a}|{w}": int(m.get(w, 0)) for a, m in got.items() for w in ("impressions", "plays", "converted")}
        )

    try:
        expected = _round(settings, "r1", 200)
        assert wait_for(lambda: totals() == expected, timeout=60), totals()
        # the parent exports the counts its child keeps in Redis
        assert wait_for(lambda: metrics.ARM_IMPRESSIONS.labels("x", "a")._value.get() == 100, timeout=15)
        assert child.proc is not None
        first = child.proc.pid
        os.kill(first, signal.SIGKILL)
        expected += _round(settings, "r2", 200)
        assert wait_for(lambda: totals() == expected, timeout=90), (totals(), expected)
        time.sleep(1.5)
        assert totals() == expected  # nothing applied twice after the restart
        assert child.starts == 2 and child.proc.pid != first
    finally:
        child.stop()
        runner.join(timeout=10)
        child.close()
    assert not runner.is_alive()
    assert child.proc is not None and child.proc.returncode == 0  # stopped by its own SIGTERM handler
