"""The lean path for plain personal and similar-track reads answers exactly as FastAPI does,
and leaves everything it is unsure of to FastAPI (real Redis, both topologies). The lean side
also reads Redis through `lean_redis` (on one Redis), the other through redis-py."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import redis
from fastapi import FastAPI
from fastapi.testclient import TestClient
from prometheus_client import REGISTRY

from core.synthetic import SyntheticMusic
from services.cli.root import Root
from services.infra.clients import Clients
from services.infra.embedded import free_port
from services.infra.settings import Settings
from services.serving.api import create_app
from services.serving.follower import UpdateFollower
from services.serving.hot_routes import HotRoutes, plain_n
from tests.integration.helpers import keys_for, publish_synthetic_model

pytestmark = [pytest.mark.integration, pytest.mark.both_topologies]
KEY = "read-key-0123456789"

PLAIN = ["/recommendations/u5", "/recommendations/u5?n=20", "/recommendations/nobody?n=3", "/similar/t3?n=7"]
PLAIN += ["/similar/no-such-track", "/recommendations/u5?n=100", f"/recommendations/{'x' * 256}"]
PASSED_ON = ["/recommendations/u5?n=0", "/recommendations/u5?n=101", "/recommendations/u5?n=abc"]
PASSED_ON += ["/recommendations/u5?n=05", "/recommendations/u5?n=5&n=6", "/recommendations/u5?n=5&explicit=false"]
PASSED_ON += ["/similar/t3?n=5&exclude=t4", "/recommendations/u5?explain=true", "/recommendations/", "/similar/a/b"]
PASSED_ON += [f"/recommendations/{'x' * 257}", "/recommendations/u5?n=%35"]


JSON = {"content-type": "application/json"}
GOOD_BODIES = [
    b'{"plays": [{"track_id": "t1", "count": 3}, {"track_id": "t2"}, {"track_id": "t1"}], "n": 5}',
    b'{"plays": [{"track_id": "no-such-track"}]}',  # nothing known: the popular fallback
    b'{"plays": [], "n": 7, "extra": 1}',
]
BAD_BODIES = [  # FastAPI answers these, in its own words
    (b"{not json", JSON),
    (b'{"plays": [{"track_id": ""}]}', JSON),
    (b'{"plays": [{"track_id": "t1", "count": 0}]}', JSON),
    (b'{"plays": "t1"}', JSON),
    (b'{"n": 5}', JSON),
    (b'{"plays": [], "n": 0}', JSON),
    (b"[" * 100_000 + b"]" * 100_000, JSON),
    (b'{"plays": [{"track_id": "t1"}]}', {"content-type": "text/plain"}),
    (b'{"plays": [{"track_id": "t1"}]}', {}),
    (b"\xff\xfe", JSON),
]


def _hot(app: FastAPI) -> HotRoutes:
    layer: Any = app.middleware_stack
    while not isinstance(layer, HotRoutes):
        layer = layer.app
    return layer


@pytest.fixture
def follower(settings: Settings, redis_client: redis.Redis) -> Iterator[UpdateFollower]:
    publish_synthetic_model(settings, redis_client, SyntheticMusic(n_users=300, n_tracks=200, seed=8))
    redis_client.hset(keys_for(settings).history("u5"), mapping={"t1": 3.0, "t2": 1.0})
    root = Root(settings)
    f = root.follower()
    f.refresh()
    yield f
    root.close()


def _pair(settings: Settings, follower: UpdateFollower) -> tuple[TestClient, TestClient]:
    def app(hot: bool) -> FastAPI:
        s = settings.with_(max_n=100)
        lean = Clients(s).lean_redis if hot else None  # the lean path's Redis client too (none on a cluster)
        return create_app(s, follower, Clients(s).aio_redis, follow=False, hot_routes=hot, lean_factory=lean)

    return TestClient(app(True)), TestClient(app(False))


def _post(client: TestClient, body: bytes, headers: dict[str, str], query: str = "") -> Any:
    return client.post(f"/recommendations{query}", content=body, headers=headers)


def _same(a: Any, b: Any) -> None:
    assert (a.status_code, a.headers["content-type"], a.headers.get("retry-after")) == (
        b.status_code,
        b.headers["content-type"],
        b.headers.get("retry-after"),
    )
    ja, jb = a.json(), b.json()
    if isinstance(ja, dict):
        ja.pop("request_id", None), jb.pop("request_id", None)
    assert ja == jb


@pytest.mark.parametrize("keyed", [False, True])
def test_plain_reads_are_answered_in_front_of_fastapi_exactly_as_fastapi_answers(
    settings: Settings, follower: UpdateFollower, keyed: bool
) -> None:
    s = settings.with_(api_keys=KEY) if keyed else settings
    fast, slow = _pair(s, follower)
    with fast, slow:
        headers = [{}, {"Authorization": f"Bearer {KEY}"}, {"X-API-Key": "wrong"}] if keyed else [{}]
        for h in headers:
            for path in PLAIN:
                _same(fast.get(path, headers=h), slow.get(path, headers=h))
        hot = _hot(fast.app)  # type: ignore[arg-type]
        assert hot.served == len(PLAIN) * len(headers)
        label = {"route": "/recommendations/{user_id}", "status": "200"}  # labelled as FastAPI's path does
        before = REGISTRY.get_sample_value("encore_http_requests_total", label) or 0.0
        assert fast.get(PLAIN[0], headers=headers[-2] if keyed else {}).status_code == 200
        assert REGISTRY.get_sample_value("encore_http_requests_total", label) == before + 1
        assert hot.served == len(PLAIN) * len(headers) + 1
        for path in PASSED_ON:
            _same(fast.get(path, headers=headers[-1]), slow.get(path, headers=headers[-1]))
        assert hot.served == len(PLAIN) * len(headers) + 1  # none of those were taken here
        for h in headers:
            for body in GOOD_BODIES:
                _same(_post(fast, body, {**JSON, **h}), _post(slow, body, {**JSON, **h}))
        taken = hot.served
        assert taken == (len(PLAIN) + len(GOOD_BODIES)) * len(headers) + 1
        good = {**headers[1], **JSON} if keyed else JSON
        for body, content in BAD_BODIES:
            _same(
                _post(fast, body, {**headers[1], **content} if keyed else content),
                _post(slow, body, {**headers[1], **content} if keyed else content),
            )
        _same(_post(fast, GOOD_BODIES[0], good, "?explain=true"), _post(slow, GOOD_BODIES[0], good, "?explain=true"))
        assert hot.served == taken


def test_a_redis_fault_on_the_lean_path_is_the_same_503(settings: Settings, follower: UpdateFollower) -> None:
    down = settings.with_(redis_url=f"redis://127.0.0.1:{free_port()}/0", redis_timeout_s=0.5)
    fast, slow = _pair(down, follower)
    with fast, slow:
        a, b = fast.get("/recommendations/u5?n=5"), slow.get("/recommendations/u5?n=5")
        _same(a, b)
        assert a.status_code == 503 and _hot(fast.app).served == 1  # type: ignore[arg-type]


@pytest.mark.unit
def test_only_a_plain_in_range_n_is_taken() -> None:
    assert plain_n(b"", 100) == 10 and plain_n(b"n=1", 100) == 1 and plain_n(b"n=100", 100) == 100
    for query in (b"n=0", b"n=101", b"n=05", b"n=-1", b"n=1&n=2", b"m=1", b"n=1 ", b"n=", b"n=9999999"):
        assert plain_n(query, 100) is None, query


@pytest.mark.unit
def test_request_ids_are_unique_hex_and_differ_between_forked_processes() -> None:
    import os

    from services.serving.api import request_id

    ids = [request_id() for _ in range(1000)]
    assert len(set(ids)) == 1000 and all(len(i) == 32 and int(i, 16) >= 0 for i in ids)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.write(write, request_id().encode())
        os._exit(0)
    os.waitpid(pid, 0)
    child = os.read(read, 64).decode()
    assert child[:16] != ids[-1][:16] and child not in ids
