"""`encore foldin` as a real process, killed with SIGKILL mid-stream and restarted."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import uuid
from collections import defaultdict

import pytest
import redis

from core.synthetic import SyntheticMusic
from services.cli.root import Root
from services.infra import kafka_admin as kafka_io
from services.infra.settings import Settings
from services.produce import PlayPublisher
from tests.integration.helpers import applied_count, consume_all, keys_for, publish_synthetic_model, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.both_topologies]


def _env(settings: Settings) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ENCORE_")}
    env.update(
        {
            "ENCORE_KAFKA_BOOTSTRAP": settings.kafka_bootstrap,
            "ENCORE_REDIS_URL": settings.redis_url,
            "ENCORE_PLAYS_TOPIC": settings.plays_topic,
            "ENCORE_DLQ_TOPIC": settings.dlq_topic,
            "ENCORE_UPDATES_TOPIC": settings.updates_topic,
            "ENCORE_TRACKS_TOPIC": settings.tracks_topic,
            "ENCORE_TRACKS_DLQ_TOPIC": settings.tracks_dlq_topic,
            "ENCORE_IMPRESSIONS_TOPIC": settings.impressions_topic,
            "ENCORE_KEY_PREFIX": settings.key_prefix,
            "ENCORE_FACTORS": str(settings.factors),
            "ENCORE_TUNE": str(settings.tune).lower(),
            "ENCORE_BATCH_MAX_EVENTS": "500",
            "ENCORE_DATA_DIR": settings.data_dir,
        }
    )
    return env


GROUP = f"encore-foldin-{uuid.uuid4().hex[:6]}"  # this module's own group (tests share one broker)


def _start(env: dict[str, str], log: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "services.cli", "foldin", "--group", GROUP],
        env=env,
        stdout=open(log, "ab"),
        stderr=subprocess.STDOUT,
    )  # noqa: SIM115


def test_kill9_loses_nothing_and_counts_nothing_twice(settings: Settings, redis_client: redis.Redis, tmp_path) -> None:
    """Also with users forgotten mid-stream, before and after the kill: each keeps exactly the
    plays made after their erasure."""
    data = SyntheticMusic(n_users=500, n_tracks=400, seed=21)
    publish_synthetic_model(settings, redis_client, data)
    kafka_io.ensure_topics(settings)
    keys = keys_for(settings)
    root = Root(settings)
    state = root.history_store(GROUP)
    env = _env(settings)
    log = str(tmp_path / "foldin.log")
    worker = _start(env, log)

    expected: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    bad: list[bytes] = []
    pub = PlayPublisher.connect(settings.kafka_bootstrap, settings.plays_topic)
    eraser = root.eraser(GROUP)
    events = list(data.events(20_000))
    erased: list[str] = []
    for j, ev in enumerate(events):
        if j in (4_000, 12_000):  # forget three users who have played, as a request would
            pub.flush()
            for user in [u for u in expected if u not in erased][:3]:
                eraser.forget(user)
                expected[user].clear()
                erased.append(user)
        if j % 200 == 7:  # malformed ones mixed in
            raw = [
                b"{broken",
                json.dumps({**ev, "count": -1}).encode(),
                json.dumps({**ev, "user_id": ""}).encode(),
            ][j % 3]
            bad.append(raw)
            pub.publish_raw(b"bad", raw)
        if j % 97 == 3:
            ev = {**ev, "private": True}
        pub.publish_raw(str(ev["user_id"]).encode(), json.dumps(ev).encode())
        if not ev.get("private") and int(ev["ms_played"]) >= 30_000:  # type: ignore[call-overload]
            expected[str(ev["user_id"])][str(ev["track_id"])] += 1.0
        if j == 8_000:
            pub.flush()
            # Kill -9 once the worker is mid-stream.
            assert wait_for(lambda: len(state.changed_since(0)) > 50, timeout=60), open(log).read()[-3000:]
            worker.send_signal(signal.SIGKILL)
            worker.wait()
            worker = _start(env, log)
    pub.flush()
    try:

        def caught_up() -> bool:
            return applied_count(settings, GROUP) >= len(events) + len(bad) + len(erased)

        assert wait_for(caught_up, timeout=120), open(log).read()[-3000:]
    finally:
        worker.send_signal(signal.SIGTERM)
        worker.wait(timeout=30)
    for user, tracks in expected.items():
        stored = {k.decode(): float(v) for k, v in redis_client.hgetall(keys.history(user)).items()}
        assert stored == {t: w for t, w in tracks.items() if w}, user
    assert len(erased) == 6
    dlq = consume_all(settings, settings.dlq_topic, len(bad), timeout=30)
    assert sorted(r.value for r in dlq) == sorted(bad)
    assert state.backlog([])[0] == 0  # no user left awaiting a re-solve
    root.close()
