"""`encore join`: the experiment join as a process of its own (for fold-in workers run with
`ENCORE_EXPERIMENT_JOIN=false`), on real servers: it joins, counts exactly once across a kill -9
and a restart, and stops on SIGTERM with exit code 0."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections import Counter

import pytest
import redis
from kafka import KafkaProducer

from services.infra import kafka_admin
from services.infra.experiment_metrics import arm_metrics
from services.infra.settings import Settings
from services.produce import PlayPublisher
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


def _join(settings: Settings, log: str) -> subprocess.Popen[bytes]:
    with open(log, "ab") as out:
        # a group of its own: the shared `encore-experiments` may hold members earlier tests left
        cmd = [sys.executable, "-m", "services.cli", "join", "--group", f"join-{settings.plays_topic}"]
        return subprocess.Popen(cmd, env=_env(settings), stdout=out, stderr=subprocess.STDOUT)


def test_encore_join_counts_exactly_once_across_a_kill9_and_stops_on_sigterm(
    settings: Settings, redis_client: redis.Redis, tmp_path
) -> None:
    kafka_admin.ensure_topics(settings)
    keys = keys_for(settings)
    log = str(tmp_path / "join.log")

    def totals() -> Counter[str]:
        got = arm_metrics(redis_client, keys).get("x", {})
        return Counter(
            {f"{a}|{w}": int(m.get(w, 0)) for a, m in got.items() for w in ("impressions", "plays", "converted")}
        )

    proc = _join(settings, log)
    try:
        expected = _round(settings, "r1", 200)
        assert wait_for(lambda: totals() == expected, timeout=60), (totals(), open(log).read()[-2000:])
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        expected += _round(settings, "r2", 200)
        proc = _join(settings, log)
        assert wait_for(lambda: totals() == expected, timeout=90), (totals(), expected)
        time.sleep(1.5)
        assert totals() == expected  # nothing applied twice after the restart
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=30)
    assert code == 0, open(log).read()[-2000:]
