"""A/B experiments on real servers: a candidate served to its arm, impressions on Kafka, the
join of later plays into per-arm metrics (exactly once on replay), and promotion."""

from __future__ import annotations

import json
import time
import uuid

import numpy as np
import pytest
import redis
from fastapi.testclient import TestClient

from core.als import ImplicitALS
from core.events import PlayEvent
from core.experiments import Experiment
from core.synthetic import SyntheticMusic
from services.cli.root import Root
from services.infra import metrics
from services.infra.experiment_metrics import arm_metrics
from services.infra.model_store import RedisModelStore, new_version
from services.infra.settings import Settings
from services.produce import PlayPublisher
from services.speed.experiment_join import ExperimentJoin
from tests.integration.helpers import consume_all, encore, keys_for, publish_synthetic_model, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.both_topologies]
SPEC = "ab:current=50,candidate=50"


def _join_until(join: ExperimentJoin, r: redis.Redis, settings: Settings, impressions: int, plays: int) -> None:
    """Step the join until its fences cover every impression and play produced."""
    keys = keys_for(settings)

    def covered() -> bool:
        join.step(timeout=0.2)
        m = arm_metrics(r, keys).get("ab", {})
        return sum(a.get("impressions", 0) for a in m.values()) >= impressions and join.counts["plays"] >= plays

    assert wait_for(covered, timeout=60), (join.counts, arm_metrics(r, keys))


def _reader(root: Root, s: Settings, cls: type[ExperimentJoin] = ExperimentJoin) -> ExperimentJoin:
    """A join in a group of its own (no committed offsets: it starts at its fences, or at the
    topics' start)."""
    topics = (s.impressions_topic, s.plays_topic)
    consumer = root.clients.group_consumer(f"join-{uuid.uuid4().hex[:6]}")
    incarnations = {t: root.clients.topic_incarnation(t) for t in topics}
    return cls(root.redis, root.keys, consumer, *topics, incarnations, s.join_window_s, s.min_ms_played)


def test_candidate_arm_impressions_join_and_promote(settings: Settings, redis_client: redis.Redis) -> None:
    s = settings.with_(experiment=SPEC, join_window_s=600.0)
    data = SyntheticMusic(n_users=400, n_tracks=300, seed=6)
    keys = keys_for(s)
    current = publish_synthetic_model(s, redis_client, data)
    cand_model = ImplicitALS(factors=8, iterations=6, random_state=1).fit(data.matrix())
    candidate = new_version()
    store = RedisModelStore(redis_client, keys)
    store.publish(
        candidate,
        cand_model,
        list(data.user_ids),
        list(data.track_ids),
        {"checkpoint_time": time.time()},
        candidate=True,
    )
    assert store.current_version() == current and store.candidate_version() == candidate
    users = [f"u{i}" for i in range(60)]
    histories = {}
    for i, u in enumerate(users):
        histories[u] = {f"t{(i * 7 + j) % 300}": float(1 + j % 3) for j in range(6)}
        redis_client.hset(keys.history(u), mapping=histories[u])  # type: ignore[arg-type]
    root = Root(s)
    root.clients.ensure_topics()
    exp = Experiment.parse(SPEC)
    assert exp is not None
    app, follower = root.serving_app(follow=False)
    follower.refresh()
    follower.arms.refresh(follower.snapshot)
    shown: dict[str, list[str]] = {}
    arms: dict[str, str] = {}
    with TestClient(app) as client:
        for u in users:
            body = client.get(f"/recommendations/{u}?n=5").json()
            arm = exp.arm_of(u)
            assert body["arm"] == arm and body["model_version"] == (current if arm == "current" else candidate)
            items = [i["track_id"] for i in body["items"]]
            assert len(items) == 5 and not set(items) & set(histories[u])
            if arm == "candidate":  # folded in per request from the live history, on the candidate's factors
                row = np.zeros((1, 300), dtype=np.float32)
                for t, w in histories[u].items():
                    row[0, int(t[1:])] = w
                vec = cand_model.fold_in(row, cand_model.item_factors_)[0]
                scores = cand_model.item_factors_ @ vec
                scores[[int(t[1:]) for t in histories[u]]] = -np.inf
                exact = [f"t{j}" for j in np.argsort(-scores)[:5]]
                assert len(set(items) & set(exact)) >= 4
            shown[body["request_id"]], arms[body["request_id"]] = items, arm
        assert len(shown) == len(users)  # one request id per answer
        assert client.get("/similar/t3?n=3").json()["arm"] == "current"
    assert {"current", "candidate"} == set(arms.values())
    records = consume_all(s, s.impressions_topic, want=len(users))
    logged = {json.loads(m.value)["request_id"]: json.loads(m.value) for m in records}
    assert set(logged) == set(shown)
    assert all(logged[r]["items"] == shown[r] and logged[r]["arm"] == arms[r] for r in shown)

    # Plays after the impressions: a recommended track (converts), two of them (two plays, one
    # conversion), a skip of one (nothing), a track not shown (nothing).
    expected = {arm: {"impressions": 0, "converted": 0, "plays": 0} for arm in ("current", "candidate")}
    for arm in arms.values():
        expected[arm]["impressions"] += 1
    pub = PlayPublisher.connect(s.kafka_bootstrap, s.plays_topic)
    by_user = {logged[r]["user_id"]: r for r in shown}
    now = time.time()
    produced = 0
    for i, u in enumerate(users):
        r_id = by_user[u]
        arm, items = arms[r_id], shown[r_id]
        if i % 4 == 0:
            pub.publish(u, items[0], ts=now, count=1)
            expected[arm]["converted"] += 1
            expected[arm]["plays"] += 1
        elif i % 4 == 1:
            pub.publish(u, items[1], ts=now, count=1)
            pub.publish(u, items[2], ts=now + 1, count=2)
            expected[arm]["converted"] += 1
            expected[arm]["plays"] += 2
            produced += 1
        elif i % 4 == 2:
            pub.publish(u, items[0], ts=now, ms_played=1000)  # a skip
        else:
            pub.publish(u, "t299" if "t299" not in items else "t298", ts=now)
            # A record without a key (the schema asks for key = user id) joins by its value.
            pub.publish_raw(None, PlayEvent(u, items[0], now + 2, None, 1, False, None).to_json())
            expected[arm]["converted"] += 1
            expected[arm]["plays"] += 1
            produced += 1
        produced += 1
        # A listener without impressions plays the same track, and a malformed record: neither
        # joins, both only move the fence (the join sends them as one op with their count).
        pub.publish(f"stranger{i}", items[0], ts=now, count=1)
        produced += 1
        if i % 10 == 0:
            pub.publish_raw(u.encode(), b"{not json")
            produced += 1
    pub.flush()
    pub.close()
    join = root.experiment_join()
    _join_until(join, redis_client, s, len(users), produced)
    got = arm_metrics(redis_client, keys)["ab"]
    for arm in expected:
        assert {k: int(got[arm][k]) for k in expected[arm]} == expected[arm], (arm, got)
        assert got[arm]["conversion"] == pytest.approx(expected[arm]["converted"] / expected[arm]["impressions"])
    join._exported_at = 0.0
    join._export()  # the same figures for Prometheus
    assert metrics.ARM_CONVERSION.labels("ab", "candidate")._value.get() == pytest.approx(
        got["candidate"]["conversion"]
    )
    join.close()

    # A reader that ignores the fences when it seeks (as after a crash between the script and
    # the commit) reads both topics from their start: the script skips every record it applied.
    class FromStart(ExperimentJoin):
        def _on_assign(self, consumer, partitions):  # type: ignore[no-untyped-def]
            consumer.assign(partitions)

    again = _reader(root, s, FromStart)
    assert wait_for(lambda: again.step(timeout=0.2) >= 0 and again.counts["replayed"] >= len(users) + produced, 60)
    assert arm_metrics(redis_client, keys)["ab"] == got and again.counts["joined"] == 0
    again.close()

    # Lost state replays: with the experiment keys gone, a new reader rebuilds the same counts.
    redis_client.delete(keys.experiment_fence, keys.experiment_metrics, *(keys.impressions_of(u) for u in users))
    rebuilt = _reader(root, s)
    _join_until(rebuilt, redis_client, s, len(users), produced)
    assert arm_metrics(redis_client, keys)["ab"] == got
    rebuilt.close()

    code, out, err = encore(s, "status", "--json")
    status = json.loads(out)["experiment"]
    assert status["running"] == "ab" and status["candidate"] == candidate, err
    assert status["arms"]["candidate"] == {"share": 0.5, "version": candidate}
    assert status["online"]["ab"] == got
    code, out, err = encore(s, "model", "list")
    listed = {row["version"]: row for row in map(json.loads, out.splitlines())}
    assert code == 0 and listed[candidate]["candidate"] and not listed[candidate]["current"], err
    code, out, err = encore(s, "model", "promote", candidate)
    assert code == 0 and json.loads(out) == {"current": candidate, "previous": current}, err
    assert store.current_version() == candidate and store.candidate_version() is None
    root.close()


def test_the_experiment_join_beside_the_fold_in_worker_can_be_turned_off(settings: Settings) -> None:
    from dataclasses import replace

    from services.cli.commands import foldin_sides
    from services.speed.catalogue_sync import CatalogueSync

    root = Root(settings)
    try:
        on = foldin_sides(root, settings)
        off = foldin_sides(root, replace(settings, experiment_join=False))
        assert [type(c) for c in on] == [CatalogueSync, ExperimentJoin]
        assert [type(c) for c in off] == [CatalogueSync]
        for c in on + off:
            c.close()
    finally:
        root.close()
