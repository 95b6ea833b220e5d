"""The HTTP API against real Redis and broker, with every bad-input case."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import redis
from fastapi.testclient import TestClient

from core.synthetic import SyntheticMusic
from services.api import Recommendations, Similar, create_app
from services.client import EncoreClient
from services.config import Settings
from services.keys import Keys
from services.serving import ServingState
from tests.integration.helpers import publish_synthetic_model

pytestmark = pytest.mark.integration


@pytest.fixture
def api(settings: Settings, redis_client: redis.Redis):
    data = SyntheticMusic(n_users=400, n_tracks=300, seed=6)
    version = publish_synthetic_model(settings, redis_client, data)
    keys = Keys(settings.key_prefix)
    redis_client.hset(keys.history("u5"), mapping={"t1": 3.0, "t2": 1.0})
    state = ServingState(settings, redis.Redis.from_url(settings.redis_url))
    state.refresh()
    with TestClient(create_app(settings, state, follow=False)) as client:
        yield client, state, version, data


def test_personal_popular_anonymous_similar(api) -> None:
    client, state, version, data = api
    r = client.get("/recommendations/u5?n=20")
    body = r.json()
    assert r.status_code == 200 and body["source"] == "personal" and body["model_version"] == version
    ids = [i["track_id"] for i in body["items"]]
    assert len(ids) == 20 and not {"t1", "t2"} & set(ids)
    scores = [i["score"] for i in body["items"]]
    assert scores == sorted(scores, reverse=True)
    Recommendations.model_validate(body)  # bodies are built without the model: they must still match /docs
    r = client.get("/recommendations/nobody-knows-me?n=5").json()
    assert r["source"] == "popular" and len(r["items"]) == 5
    g = int(np.argmax(np.bincount(data.track_genre)))
    genre0 = np.flatnonzero(data.track_genre == g)
    liked = genre0[np.argsort(-data.track_popularity[genre0])[:5]]
    plays = [{"track_id": f"t{i}", "count": 3} for i in liked]
    r = client.post("/recommendations", json={"plays": plays, "n": 10}).json()
    assert r["source"] == "personal" and len(r["items"]) == 10
    assert not {p["track_id"] for p in plays} & {i["track_id"] for i in r["items"]}
    genres = data.track_genre[[int(i["track_id"][1:]) for i in r["items"]]]
    assert (genres == g).mean() >= 0.3  # several times a random pick's share
    r = client.get("/similar/t3?n=7").json()
    Similar.model_validate(r)
    assert len(r["items"]) == 7 and "t3" not in {i["track_id"] for i in r["items"]}
    assert client.get("/health").json() == {"status": "ok"}
    ready = client.get("/ready").json()
    assert ready["ready"] is True
    for space in ("ip", "cosine"):  # search breadth measured per index on the model's query sample
        info = ready["index"][space]
        assert info["recall@10"] >= info["recall@10_lower_95"] >= 0.95 and info["ef"] >= 40
    assert "encore_http_requests_total" in client.get("/metrics").text


@pytest.mark.parametrize(
    "method, path, body, code",
    [
        ("get", "/similar/no-such-track", None, 404),
        ("get", "/recommendations/u5?n=0", None, 422),
        ("get", "/recommendations/u5?n=-3", None, 422),
        ("get", "/recommendations/u5?n=100000", None, 422),
        ("get", "/recommendations/u5?n=abc", None, 422),
        ("get", "/similar/t3?n=0", None, 422),
        ("post", "/recommendations", b"{not json", 422),
        ("post", "/recommendations", {"plays": [{"track_id": "t1", "count": -1}]}, 422),
        ("post", "/recommendations", {"plays": "t1"}, 422),
        ("post", "/recommendations", {"plays": [], "n": 1000}, 422),
    ],
)
def test_bad_input_is_4xx_never_500(api, method: str, path: str, body, code: int) -> None:
    client = api[0]
    if method == "get":
        r = client.get(path)
    elif isinstance(body, bytes):
        r = client.post(path, content=body, headers={"content-type": "application/json"})
    else:
        r = client.post(path, json=body)
    assert r.status_code == code, r.text
    assert "detail" in r.json()


def test_factor_update_moves_a_track_in_place(api) -> None:
    client, state, version, _ = api
    vec = state.snapshot.ip.vector("t5")
    state.apply_update(
        b"track:t5",
        __import__("json").dumps({"model_version": version, "vector": list(map(float, -vec))}).encode(),
    )
    np.testing.assert_allclose(state.snapshot.ip.vector("t5"), -vec, rtol=1e-6)
    state.apply_update(
        b"track:new-one",
        __import__("json").dumps({"model_version": version, "vector": list(map(float, vec))}).encode(),
    )
    assert "new-one" in state.snapshot.cosine
    r = client.get("/similar/new-one?n=3")
    assert r.status_code == 200
    state.apply_update(b"track:new-one", None)
    assert client.get("/similar/new-one").status_code == 404


def test_lookup_client(api, settings: Settings) -> None:
    _, state, version, _ = api
    c = EncoreClient(settings.redis_url, settings.key_prefix)
    assert c.current_version() == version
    assert c.user_vector("u5").shape == (settings.factors,)
    top = c.top_n("u5", 10)
    assert len(top) == 10 and not {"t1", "t2"} & {t for t, _ in top}
    hnsw = [t for t, _ in state.snapshot.ip.query(c.user_vector("u5"), 10, exclude=["t1", "t2"])]
    assert len(set(hnsw) & {t for t, _ in top}) >= 8
    assert c.user_vector("nobody") is None
    c.close()


def test_deletions_trigger_a_background_rebuild(api) -> None:
    client, state, _, _ = api
    before = state.snapshot
    gone = [f"t{i}" for i in range(100, 200)]
    for t in gone:
        state.apply_update(f"track:{t}".encode(), None)
    from tests.integration.helpers import wait_for

    assert wait_for(lambda: state.snapshot is not before and not state._rebuilding, timeout=30)
    snap = state.snapshot
    # Deletions that arrived while it rebuilt were replayed onto the new graph.
    assert snap.ip.deleted < 50 and len(snap.ip) == len(before.loaded.track_ids) - 100
    items = client.get("/recommendations/u5?n=50").json()["items"]
    assert len(items) == 50 and not set(gone) & {i["track_id"] for i in items}


def test_a_worker_loading_its_first_model_makes_requests_wait_not_fail(
    settings: Settings, redis_client: redis.Redis
) -> None:
    """With several workers, one may answer /ready while another still loads the snapshot:
    a request that reaches the late one waits for the model instead of getting a 503."""
    state = ServingState(settings, redis.Redis.from_url(settings.redis_url))
    with TestClient(create_app(settings, state, follow=False)) as client:
        assert client.get("/recommendations/u5").status_code == 503  # no model published at all: at once
        publish_synthetic_model(settings, redis_client, SyntheticMusic(n_users=200, n_tracks=150, seed=9))
        threading.Timer(0.5, state.refresh).start()  # this worker's follower notices the model later
        r = client.get("/recommendations/u5?n=5")
        assert r.status_code == 200 and len(r.json()["items"]) == 5
