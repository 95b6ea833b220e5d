"""The HTTP API against real Redis and broker, with every bad-input case."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest
import redis
from fastapi.testclient import TestClient

from core.messages import FactorUpdate
from core.synthetic import SyntheticMusic
from services.cli.root import Root
from services.client import EncoreClient
from services.infra.settings import Settings
from services.serving.http_models import Recommendations, Similar
from tests.integration.helpers import keys_for, publish_synthetic_model, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.both_topologies]


@pytest.fixture
def api(settings: Settings, redis_client: redis.Redis):
    data = SyntheticMusic(n_users=400, n_tracks=300, seed=6)
    version = publish_synthetic_model(settings, redis_client, data)
    keys = keys_for(settings)
    redis_client.hset(keys.history("u5"), mapping={"t1": 3.0, "t2": 1.0})
    root = Root(settings)
    app, follower = root.serving_app(follow=False)  # the test drives the follower by hand
    follower.refresh()
    with TestClient(app) as client:
        yield client, follower, version, data
    root.close()


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
        assert max(info["ef_per_band"]) == info["ef"]
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
    # Both encodings a producer may use: base64 of the float32 bytes, and a JSON list.
    state.apply(FactorUpdate.decode(b"track:t5", FactorUpdate("track", "t5", version, -vec).value()))
    np.testing.assert_allclose(state.snapshot.ip.vector("t5"), -vec, rtol=1e-6)
    as_list = json.dumps({"model_version": version, "vector": list(map(float, vec))}).encode()
    state.apply(FactorUpdate.decode(b"track:new-one", as_list))
    assert "new-one" in state.snapshot.cosine
    r = client.get("/similar/new-one?n=3")
    assert r.status_code == 200
    state.apply(FactorUpdate.decode(b"track:new-one", None))
    assert client.get("/similar/new-one").status_code == 404
    # A vector of another version is not comparable with this index: ignored.
    state.apply(FactorUpdate("track", "t5", "some-other-version", vec))
    np.testing.assert_allclose(state.snapshot.ip.vector("t5"), -vec, rtol=1e-6)


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
    client, state, version, _ = api
    before = state.snapshot
    gone = [f"t{i}" for i in range(100, 200)]
    for t in gone:
        state.apply(FactorUpdate("track", t))
    assert state._rebuilding is before  # 100 of 300 deleted: past the share that starts a rebuild
    moved = -before.ip.vector("t7")
    state.apply(FactorUpdate("track", "t7", version, moved))  # lands after the rebuild's copy
    assert wait_for(state.finish_rebuild, timeout=30)  # the follower swaps it in, then replays
    snap = state.snapshot
    assert snap is not before and len(snap.ip) == len(before.loaded.track_ids) - 100
    assert snap.ip.deleted < before.ip.deleted / 2  # only what arrived after the copy
    np.testing.assert_allclose(snap.ip.vector("t7"), moved, rtol=1e-6)  # the newer vector won
    items = client.get("/recommendations/u5?n=50").json()["items"]
    assert len(items) == 50 and not set(gone) & {i["track_id"] for i in items}


def test_a_worker_loading_its_first_model_makes_requests_wait_not_fail(
    settings: Settings, redis_client: redis.Redis
) -> None:
    """With several workers, one may answer /ready while another still loads the snapshot:
    a request that reaches the late one waits for the model instead of getting a 503."""
    root = Root(settings)
    app, state = root.serving_app(follow=False)
    with TestClient(app) as client:
        assert client.get("/recommendations/u5").status_code == 503  # no model published at all: at once
        publish_synthetic_model(settings, redis_client, SyntheticMusic(n_users=200, n_tracks=150, seed=9))
        threading.Timer(0.5, state.refresh).start()  # this worker's follower notices the model later
        r = client.get("/recommendations/u5?n=5")
        assert r.status_code == 200 and len(r.json()["items"]) == 5


def test_ready_speaks_for_every_worker_of_the_server(api) -> None:
    """Workers share one port and a probe reaches one of them: a worker that has loaded everything
    says "not ready" while a sibling (its slot on the shared board) is still loading."""
    from services.serving.ready_board import ReadyBoard

    client, follower, _, _ = api
    board = ReadyBoard(3)
    follower.seat = board.seat(1)
    try:
        follower.step()  # this worker reports itself ready on its board slot
        r = client.get("/ready")
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        assert r.json()["reason"] == "2 other worker(s) of this server still loading"
        board.seat(0).report(True)
        assert "1 other worker(s)" in client.get("/ready").json()["reason"]
        board.seat(2).report(True)
        assert board.all_ready() and client.get("/ready").status_code == 200
        assert client.get("/recommendations/u5?n=5").status_code == 200  # answers meanwhile too
    finally:
        follower.seat = None


def test_redis_unreachable_is_a_503_with_retry_after(api, settings: Settings) -> None:
    """The edge maps a state-store fault to 503 + Retry-After, within the client timeout."""
    from services.infra.clients import Clients
    from services.infra.embedded import free_port
    from services.serving.api import create_app

    _, follower, _, _ = api
    down = settings.with_(redis_url=f"redis://127.0.0.1:{free_port()}/0", redis_timeout_s=0.5)
    with TestClient(create_app(down, follower, Clients(down).aio_redis, follow=False)) as client:
        r = client.get("/recommendations/u5?n=5")
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        assert "state store unavailable" in r.json()["detail"]
        assert client.post("/recommendations", json={"plays": [{"track_id": "t1"}]}).status_code == 200


def test_a_hung_redis_gets_a_bounded_503_and_ready_says_why(api, settings: Settings) -> None:
    """Redis stopped with SIGSTOP (accepts connections, never answers): no request hangs."""
    import os
    import signal

    from services.infra.clients import Clients
    from services.infra.embedded import EmbeddedServers
    from services.serving.api import create_app

    _, follower, _, _ = api
    own = EmbeddedServers.start(kafka=False)
    try:
        hung = settings.with_(redis_url=own.redis_url, redis_timeout_s=0.5)
        with TestClient(create_app(hung, follower, Clients(hung).aio_redis, follow=False)) as client:
            assert client.get("/ready").status_code == 200
            os.kill(own.procs[0].pid, signal.SIGSTOP)
            try:
                r = client.get("/recommendations/u5?n=5")
                assert r.status_code == 503 and r.headers["retry-after"] == "1"
                ready = client.get("/ready")
                assert ready.status_code == 503 and "Redis unreachable" in ready.json()["reason"]
            finally:
                os.kill(own.procs[0].pid, signal.SIGCONT)
            assert client.get("/recommendations/u5?n=5").status_code == 200  # recovers by itself
            assert client.get("/ready").status_code == 200
    finally:
        own.stop()


def test_a_rebuild_that_outlives_a_version_swap_never_brings_the_old_version_back(
    api, settings: Settings, redis_client: redis.Redis
) -> None:
    """Found by the chaos soak: a rebuild thread of version A finishing after the swap to B (and
    after B's own rebuild started) was swapped in, serving A again until the next refresh."""
    client, state, version_a, _ = api
    snap_a = state.snapshot
    state._start_rebuild(snap_a)  # A's rebuild thread runs ...
    version_b = publish_synthetic_model(settings, redis_client, SyntheticMusic(n_users=400, n_tracks=350, seed=8))
    assert state.refresh() and state.snapshot.version == version_b  # ... the swap to B happens meanwhile
    state._start_rebuild(state.snapshot)  # and B starts its own rebuild
    assert wait_for(lambda: len(state._finished) == 2, timeout=30)
    assert state.finish_rebuild()  # B's rebuild is swapped in; A's is dropped
    assert state.snapshot.version == version_b and len(state.snapshot.ip) == 350
    assert client.get("/similar/t340?n=5").status_code == 200  # a track only B knows
