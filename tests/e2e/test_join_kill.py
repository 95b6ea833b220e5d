"""The experiment join counts exactly once across SIGKILLs of the `encore foldin` process."""

from __future__ import annotations

import json
import random
import signal
import time
from collections import Counter

import pytest
import redis
from kafka import KafkaProducer

from services.infra import kafka_admin
from services.infra.experiment_metrics import arm_metrics
from services.infra.settings import Settings
from services.produce import PlayPublisher
from tests.e2e.test_foldin_kill import _env, _start
from tests.integration.helpers import keys_for, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.both_topologies]
ROUNDS, PER_ROUND = 12, 400


def test_join_counts_exactly_once_across_kill9(settings: Settings, redis_client: redis.Redis, tmp_path) -> None:
    kafka_admin.ensure_topics(settings)
    keys = keys_for(settings)
    log = str(tmp_path / "foldin.log")
    rng = random.Random(5)
    imp = KafkaProducer(bootstrap_servers=settings.kafka_bootstrap, linger_ms=5)
    plays = PlayPublisher.connect(settings.kafka_bootstrap, settings.plays_topic)
    expected: Counter[str] = Counter()
    proc = _start(_env(settings), log)
    kills = 0
    for rnd in range(ROUNDS):
        now = time.time()
        for i in range(PER_ROUND):
            user, arm = f"r{rnd}u{i}", ("a", "b")[i % 2]
            items = [f"t{(i * 3 + j) % 500}" for j in range(5)]
            record = {
                "v": 1,
                "request_id": f"{rnd}-{i}",
                "user_id": user,
                "experiment": "k",
                "arm": arm,
                "model_version": "v",
                "items": items,
                "ts": now,
            }
            imp.send(settings.impressions_topic, key=user.encode(), value=json.dumps(record).encode())
            expected[f"{arm}|impressions"] += 1
        imp.flush()
        for i in range(PER_ROUND):
            user, arm = f"r{rnd}u{i}", ("a", "b")[i % 2]
            kind = i % 5
            if kind in (0, 1):  # one play of a shown track, or two
                plays.publish(user, f"t{(i * 3) % 500}", ts=now + 1)
                expected[f"{arm}|plays"] += 1
                expected[f"{arm}|converted"] += 1
                if kind == 1:
                    plays.publish(user, f"t{(i * 3 + 4) % 500}", ts=now + 2, count=3)
                    expected[f"{arm}|plays"] += 1
            elif kind == 2:
                plays.publish(user, "t-not-shown", ts=now + 1)
            elif kind == 3:
                plays.publish(user, f"t{(i * 3) % 500}", ts=now + 1, ms_played=500)  # a skip
        plays.flush()
        time.sleep(rng.uniform(0.1, 1.2))
        if proc.poll() is None and rnd % 2 == 0:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            kills += 1
            proc = _start(_env(settings), log)
    imp.close()
    plays.close()

    def totals() -> Counter[str]:
        got = arm_metrics(redis_client, keys).get("k", {})
        return Counter(
            {
                f"{arm}|{what}": int(m.get(what, 0))
                for arm, m in got.items()
                for what in ("impressions", "plays", "converted")
            }
        )

    try:
        assert wait_for(lambda: totals() == expected, timeout=180), (totals(), expected, open(log).read()[-3000:])
        time.sleep(2.0)  # nothing more arrives after the counts match
        assert totals() == expected
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    assert kills >= 5
