"""`encore status` on real servers: what it reports matches the state, and its exit code."""

from __future__ import annotations

import json

import pytest
import redis

from services.batch.trainer import GROUP as TRAINER_GROUP
from services.cli.produce import produce, synthetic_stream
from services.cli.root import Root
from services.infra.embedded import free_port
from services.infra.settings import Settings
from services.produce import PlayPublisher
from services.speed.worker import GROUP as FOLDIN_GROUP
from tests.integration.helpers import WorkerThread, encore, wait_for

pytestmark = pytest.mark.integration


def test_status_reports_state_offsets_lag_retrain_and_problems(settings: Settings, redis_client: redis.Redis) -> None:
    root = Root(settings)
    root.clients.ensure_topics()
    code, out, err = encore(settings, "status", "--json")
    assert code == 1 and "no model" in json.loads(out)["problems"][0]
    pub = PlayPublisher.connect(settings.kafka_bootstrap, settings.plays_topic)
    n = produce(pub, synthetic_stream(200, 100, 3, 3000, live=False))
    pub.close()
    trainer = root.trainer()
    version = trainer.run_once()
    trainer.close()
    w = WorkerThread(settings, FOLDIN_GROUP)
    try:
        stored = root.history_store()
        inc = root.clients.topic_incarnation(settings.plays_topic)
        assert wait_for(lambda: sum(o + 1 for o in stored.applied_offsets(inc).values()) >= n, timeout=60)
    finally:
        w.stop()
    code, out, err = encore(settings, "status", "--json")
    report = json.loads(out)
    assert code == 0 and report["problems"] == [], report["problems"]
    assert report["model"]["version"] == version and report["model"]["holdout"]["precision@10"] > 0
    fold = report["groups"][FOLDIN_GROUP]
    assert fold["lag"] == 0
    assert {int(p): x["state"] for p, x in fold["partitions"].items()} == stored.applied_offsets(inc)
    assert all(x["committed"] == x["state"] + 1 for x in fold["partitions"].values())
    assert report["groups"][TRAINER_GROUP]["lag"] == 0
    assert report["trainer"]["last_retrain_outcome"] == "published"
    assert report["trainer"]["last_version"] == version
    # A replay gap needs a person: exit 1, and the table says what.
    root.board().report_gap(FOLDIN_GROUP, inc, 0, 10, 50)
    code, out, err = encore(settings, "status")
    assert code == 1 and "PROBLEM    replay gap" in out and "40 messages" in out
    root.close()
    # Redis unreachable: exit 2 with a one-line reason, no traceback.
    away = settings.with_(redis_url=f"redis://127.0.0.1:{free_port()}/0", redis_timeout_s=1.0)
    code, out, err = encore(away, "status")
    assert code == 2 and "cannot reach Redis or Kafka" in out and "Traceback" not in err
