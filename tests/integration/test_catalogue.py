"""The catalogue end to end on a real broker and Redis: `encore produce --tracks`, the Redis copy
and its dead letters, filters on every route, takedown across replicas, explanations, related
artists and radio."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis
from fastapi.testclient import TestClient

from core.catalogue import TrackInfo
from core.synthetic import SyntheticMusic
from services.cli.root import Root
from services.infra import rdkafka
from services.infra.settings import Settings
from services.speed.catalogue_sync import CatalogueSync
from tests.integration.helpers import consume_all, encore, keys_for, publish_synthetic_model, wait_for

pytestmark = pytest.mark.integration


def _entry(i: int, genre: int) -> dict[str, Any]:
    return {
        "v": 1,
        "track_id": f"t{i}",
        "artist_id": f"a{i % 30}",
        "title": f"Track {i}",
        "tags": [f"g{genre}"],
        "explicit": i % 4 == 0,
        "regions": ["SE"] if i % 5 == 0 else None,
        "available": True,
    }


def _sync(settings: Settings, root: Root, group: str) -> CatalogueSync:
    clients = root.clients
    consumer = rdkafka.consumer(settings.kafka_bootstrap, group, **clients.rdkafka_security)
    return CatalogueSync(
        root.redis, root.keys, consumer, clients.update_publisher(), settings.tracks_topic, settings.tracks_dlq_topic
    )


@pytest.mark.both_topologies
def test_catalogue_file_reaches_redis_and_invalid_entries_the_dead_letter_topic(
    settings: Settings, redis_client: redis.Redis, tmp_path: Path
) -> None:
    jsonl = tmp_path / "tracks.jsonl"
    good = [_entry(i, 0) for i in range(3)]
    lines = [json.dumps(e) for e in good] + ['{"v": 1, "track_id": "t9", "explicit": "yes"}', "not json"]
    jsonl.write_text("\n".join(lines) + "\n")
    csv = tmp_path / "tracks.csv"
    csv.write_text("track_id,artist_id,title,tags,explicit,regions\nc1,a1,One,rock|pop,false,SE|NO\nc2,,Two,,true,\n")
    for path in (jsonl, csv):
        code, out, err = encore(settings, "produce", "--tracks", str(path))
        assert code == 0, err
    assert json.loads(out) == {"produced": 2}
    code, _, err = encore(settings, "produce", "--tracks", str(tmp_path / "missing.csv"))
    assert code != 0 and "no such file" in err and "Traceback" not in err

    root = Root(settings)
    keys = keys_for(settings)
    sync = _sync(settings, root, "catalogue-test")
    assert wait_for(lambda: sync.step(0.2) >= 0 and sync.applied + sync.dead_letters >= 7, timeout=30)
    assert sync.applied == 5 and sync.dead_letters == 2
    stored = TrackInfo.decode(b"t1", redis_client.get(keys.catalogue("t1")))[1]
    assert stored == TrackInfo.from_dict(good[1])
    c1 = TrackInfo.decode(b"c1", redis_client.get(keys.catalogue("c1")))[1]
    assert c1 is not None and c1.tags == {"rock", "pop"} and c1.regions == {"SE", "NO"} and not c1.explicit
    c2 = TrackInfo.decode(b"c2", redis_client.get(keys.catalogue("c2")))[1]
    assert c2 is not None and c2.artist_id is None and c2.explicit and c2.regions is None
    letters = consume_all(settings, settings.tracks_dlq_topic, 2)
    reasons = " | ".join(dict(r.headers)["error"].decode() for r in letters)
    assert len(letters) == 2 and "explicit must be true or false" in reasons and "not JSON" in reasons

    # A null value removes the entry; a replay from the start (a new group) ends in the same state.
    producer = root.clients.producer()
    producer.send(settings.tracks_topic, key=b"t0", value=None).get(timeout=15)
    assert wait_for(lambda: sync.step(0.2) >= 0 and redis_client.get(keys.catalogue("t0")) is None, timeout=30)
    before = {k: redis_client.get(keys.catalogue(k)) for k in ("t0", "t1", "t2", "c1", "c2")}
    replay = _sync(settings, root, "catalogue-replay")
    assert wait_for(lambda: replay.step(0.2) >= 0 and replay.applied + replay.dead_letters >= 8, timeout=30)
    assert {k: redis_client.get(keys.catalogue(k)) for k in before} == before
    for s in (sync, replay):
        s.close()
    producer.close()
    root.close()


@pytest.fixture
def served(settings: Settings, redis_client: redis.Redis) -> Iterator[tuple[Any, ...]]:
    """A model of 300 tracks with a catalogue for all of them, and two replicas' apps."""
    data = SyntheticMusic(n_users=400, n_tracks=300, seed=6)
    version = publish_synthetic_model(settings, redis_client, data)
    keys = keys_for(settings)
    redis_client.hset(keys.history("u5"), mapping={"t1": 3.0, "t2": 1.0, "t40": 2.0})
    root = Root(settings)
    publish = root.track_publisher()
    for i in range(300):
        publish(f"t{i}", TrackInfo.from_dict(_entry(i, int(data.track_genre[i]))))
    replicas = []
    for _ in range(2):
        r = Root(settings)
        app, follower = r.serving_app(follow=False)  # the test steps each follower
        follower.refresh()
        replicas.append((r, app, follower))
    with TestClient(replicas[0][1]) as a, TestClient(replicas[1][1]) as b:
        for client, (_, _, follower) in zip((a, b), replicas, strict=True):
            # Not ready until the catalogue as it stood at start is applied.
            feed = follower.catalogue_feed
            assert feed is not None
            ready = client.get("/ready")
            assert ready.status_code == 200 if feed.loaded else "catalogue" in ready.json()["reason"]
            assert wait_for(lambda f=follower: (f.step() or True) and len(f.catalogue) == 300, timeout=30)
            assert feed.loaded and client.get("/ready").status_code == 200
        yield a, b, replicas[0][2], replicas[1][2], data, version
    for r, _, _ in replicas:
        r.close()
    root.close()


def _ids(body: dict[str, Any]) -> list[str]:
    return [i["track_id"] for i in body["items"]]


def test_filters_hold_on_every_route_and_still_fill_n(served: tuple[Any, ...]) -> None:
    client, _, _, _, data, _ = served
    genre = int(data.track_genre[3])
    tag = f"g{genre}"
    in_genre = {f"t{i}" for i in np.flatnonzero(data.track_genre == genre)}
    query = f"explicit=false&region=US&tags={tag}&max_per_artist=1&exclude=t3,t6&exclude=t9"
    for path in ("/recommendations/u5", "/recommendations/nobody", "/similar/t3"):
        body = client.get(f"{path}?n=5&{query}").json()
        ids = _ids(body)
        assert len(ids) == 5, (path, body)
        nums = [int(t[1:]) for t in ids]
        assert all(n % 4 and n % 5 for n in nums)  # not explicit, not SE-only
        assert set(ids) <= in_genre and not {"t3", "t6", "t9", "t1", "t2", "t40"} & set(ids)
        assert len({n % 30 for n in nums}) == 5  # one per artist
    body = client.post(f"/recommendations?n=5&{query}", json={"plays": [{"track_id": "t3"}], "n": 5}).json()
    assert len(_ids(body)) == 5 and set(_ids(body)) <= in_genre
    # The popular fallback obeys the same filters and fills n whenever n tracks pass.
    passing = [t for t in in_genre if int(t[1:]) % 4 and int(t[1:]) % 5]
    artists = {int(t[1:]) % 30 for t in passing}
    body = client.get(f"/recommendations/nobody?n=100&explicit=false&region=US&tags={tag}&max_per_artist=1").json()
    assert body["source"] == "popular" and len(body["items"]) == len(artists)
    assert client.get("/recommendations/u5?region=USA").status_code == 422
    assert client.get("/recommendations/u5?max_per_artist=0").status_code == 422
    assert client.get("/recommendations/u5?exclude=" + ",".join(f"x{i}" for i in range(1001))).status_code == 422


def test_a_takedown_reaches_every_replica_and_similar_answers_404(served: tuple[Any, ...], settings: Settings) -> None:
    a, b, _, follower_b, _, _ = served
    seen = [t for t in _ids(a.get("/recommendations/nobody?n=20").json())]
    victim = seen[0]
    assert a.get(f"/similar/{victim}?n=3").status_code == 200
    r = a.post(f"/admin/tracks/{victim}/hide")
    assert r.status_code == 200 and r.json() == {"track_id": victim, "available": False}
    assert victim not in _ids(a.get("/recommendations/nobody?n=20").json())  # this replica at once
    assert a.get(f"/similar/{victim}").status_code == 404
    # The other replica learns it from the tracks topic on its next polls.
    assert wait_for(lambda: (follower_b.step() or True) and not follower_b.catalogue.available(victim), timeout=10)
    for path in ("/recommendations/nobody?n=50", "/recommendations/u5?n=50", f"/similar/{seen[1]}?n=50"):
        assert victim not in _ids(b.get(path).json())
    assert b.get(f"/similar/{victim}").status_code == 404
    assert a.post(f"/admin/tracks/{victim}/show").json()["available"] is True
    assert wait_for(lambda: (follower_b.step() or True) and follower_b.catalogue.available(victim), timeout=10)
    assert b.get(f"/similar/{victim}").status_code == 200


def test_explanations_name_played_tracks_that_add_up(served: tuple[Any, ...]) -> None:
    client, _, follower, _, _, _ = served
    body = client.get("/recommendations/u5?n=5&explain=true").json()
    assert body["source"] == "personal"
    for item in body["items"]:
        because = item["because"]
        assert 1 <= len(because) <= 3 and {c["track_id"] for c in because} <= {"t1", "t2", "t40"}
        weights = [c["weight"] for c in because]
        assert weights == sorted(weights, reverse=True)
    # With three played tracks every contribution is listed: they sum to the exactly solved score.
    snap = follower.snapshot
    history = {"t1": 3.0, "t2": 1.0, "t40": 2.0}
    x = snap.fold_in_plays(history)
    for item in body["items"]:
        exact = float(snap.ip.vector(item["track_id"]) @ x)
        assert abs(sum(c["weight"] for c in item["because"]) - exact) <= 1e-3 * max(1.0, abs(exact))
    anon = client.post("/recommendations?explain=true", json={"plays": [{"track_id": "t7", "count": 2}]}).json()
    assert all(i["because"][0]["track_id"] == "t7" for i in anon["items"])
    assert all("because" not in i for i in client.get("/recommendations/u5?n=3").json()["items"])
    assert all(i["because"] == [] for i in client.get("/recommendations/nobody?explain=true").json()["items"])


def test_related_artists_and_radio(served: tuple[Any, ...], settings: Settings) -> None:
    client, _, _, _, _, version = served
    body = client.get("/similar-artists/a3?n=5").json()
    assert body["model_version"] == version and len(body["items"]) == 5
    assert "a3" not in {i["artist_id"] for i in body["items"]}
    assert client.get("/similar-artists/nobody").status_code == 404
    window = settings.radio_artist_window
    for seed in ("seed_track=t3", "seed_artist=a3"):
        body = client.get(f"/radio?{seed}&user=u5&n=40&explicit=false").json()
        ids = _ids(body)
        assert len(ids) == 40 and len(set(ids)) == 40 and "t3" not in ids
        assert not {"t1", "t2", "t40"} & set(ids)  # the listener's played tracks are left out
        artists = [int(t[1:]) % 30 for t in ids]
        assert all(artists[i] not in artists[max(0, i - window + 1) : i] for i in range(len(artists)))
        assert all(int(t[1:]) % 4 for t in ids)
    # Both seeds together; the listener alone; nothing at all (what is popular): same rules.
    for query, seed in (
        ("seed_track=t3&seed_artist=a7&user=u5", "track:t3+artist:a7"),
        ("user=u5", "user:u5"),
        ("", "popular"),
    ):
        body = client.get(f"/radio?{query}&n=30").json()
        ids = _ids(body)
        assert body["seed"] == seed and len(ids) == 30 and len(set(ids)) == 30, body
        artists = [int(t[1:]) % 30 for t in ids]
        assert all(artists[i] not in artists[max(0, i - window + 1) : i] for i in range(len(artists)))
        if "u5" in query:
            assert not {"t1", "t2", "t40"} & set(ids)
    assert client.get("/radio?seed_track=nope").status_code == 404
    assert client.get("/radio?seed_artist=nobody").status_code == 404


def test_a_forked_worker_reads_the_catalogue_before_it_accepts(served: tuple[Any, ...], settings: Settings) -> None:
    """What an `encore serve` worker does before uvicorn starts: it adopts the parent's snapshot,
    applies the whole `tracks` topic as it stood (no follower step yet) and says so on its slot."""
    from services.serving.ready_board import ReadyBoard

    *_, version = served
    r = Root(settings)
    try:
        _, follower = r.serving_app(follow=False)
        follower.adopt(follower.builder.build(version))
        board = ReadyBoard(2)
        follower.seat = board.seat(0)
        assert follower.loading() == "catalogue still loading"
        follower.preload(30.0)
        feed = follower.catalogue_feed
        assert feed is not None and feed.loaded and len(follower.catalogue) == 300
        assert follower.loading() is None and board.waiting() == 1 and board.waiting(but=1) == 0
    finally:
        r.close()
